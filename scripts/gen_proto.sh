#!/usr/bin/env bash
# Regenerate the Python protobuf/gRPC modules in src/inferstack/_proto/.
# Run from the repository root. Uses .venv/bin/python when it exists.
set -euo pipefail

if [[ -x .venv/bin/python ]]; then
    PYTHON=.venv/bin/python
else
    PYTHON=python
fi

# -I src makes the generated imports read `from inferstack._proto import ...`.
"$PYTHON" -m grpc_tools.protoc \
    -I src \
    --python_out=src \
    --pyi_out=src \
    --grpc_python_out=src \
    src/inferstack/_proto/*.proto

# model_config.proto declares no service, so its *_pb2_grpc.py is an empty
# stub (that still imports grpc); drop it.
rm -f src/inferstack/_proto/model_config_pb2_grpc.py

# Register our descriptors in a private pool (see _pool.py) rather than
# protobuf's default one, so tritonclient.grpc can be imported beside us.
for module in src/inferstack/_proto/*_pb2.py; do
    sed -i \
        -e 's/^DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile(/DESCRIPTOR = _pool.POOL.AddSerializedFile(/' \
        -e 's/^from google.protobuf import descriptor_pool as _descriptor_pool$/from inferstack._proto import _pool/' \
        "$module"
done
