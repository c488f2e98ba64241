# Two commands do all the set-up on a fresh machine:
#   make serve   installs inferstack into .venv and serves examples/model_repository
#   make test    installs the test dependencies and runs the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 0.0.0.0

.PHONY: serve test install install-test install-prometheus bench examples proto

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

install: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .

install-test: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[test]"
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || $(MAKE) --no-print-directory install-prometheus

# The deploy tests run a real Prometheus and promtool (Debian's package). Needs root or passwordless sudo and apt;
# elsewhere it only warns, and those tests skip naming the missing binary.
install-prometheus:
	@SUDO=; [ "$$(id -u)" = 0 ] || SUDO="sudo -n"; \
	if command -v apt-get >/dev/null; then \
		export DEBIAN_FRONTEND=noninteractive; \
		$$SUDO apt-get install -y -q --no-install-recommends prometheus >/dev/null 2>&1 || \
		{ $$SUDO apt-get update -q >/dev/null 2>&1 && \
		  $$SUDO apt-get install -y -q --no-install-recommends prometheus >/dev/null 2>&1; } || \
		echo "warning: could not install Debian's prometheus package; the Prometheus deploy tests will skip"; \
	else echo "warning: no apt-get; install prometheus and promtool for the Prometheus deploy tests"; fi

serve: install
	$(BIN)/inferstack serve --model-repository examples/model_repository --host $(HOST) \
		--http-port 8000 --grpc-port 8001 --metrics-port 8002

test: install-test
	$(BIN)/python -m pytest

bench: install-test
	$(BIN)/python benchmarks/bench_server.py

examples: install-test
	$(BIN)/python examples/generate_models.py

proto: install-test
	bash scripts/gen_proto.sh
