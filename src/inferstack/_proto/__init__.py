"""Protocol buffer definitions and generated gRPC code for inferstack.

Holds ``model_config.proto`` (the ``inference.ModelConfig`` schema used by
``config.pbtxt``) and ``grpc_service.proto`` (the ``inference.GRPCInferenceService``
API), both wire-compatible with NVIDIA Triton, plus the modules generated from
them: ``model_config_pb2``, ``grpc_service_pb2`` and ``grpc_service_pb2_grpc``
(with ``.pyi`` stubs).

The generated modules are checked in. After editing a ``.proto`` file,
regenerate them from the repository root with::

    scripts/gen_proto.sh

which runs::

    python -m grpc_tools.protoc -I src --python_out=src --pyi_out=src \\
        --grpc_python_out=src src/inferstack/_proto/*.proto
"""
