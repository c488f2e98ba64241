# Two commands do all the set-up on a fresh machine:
#   make serve   installs inferstack into .venv and serves examples/model_repository
#   make test    installs the test dependencies and runs the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 0.0.0.0

.PHONY: serve test install install-test bench examples proto

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

install: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .

install-test: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[test]"

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
