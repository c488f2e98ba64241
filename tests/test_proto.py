"""Our protobuf modules interoperate with (and coexist with) NVIDIA's generated ones."""

from inferstack._proto import grpc_service_pb2
from inferstack.repository.config import parse_config_text


def test_tritonclient_grpc_imports_beside_our_protos_and_reads_our_bytes():
    from tritonclient.grpc import service_pb2  # registers inference.* in the default pool

    config = parse_config_text(
        'max_batch_size: 3 input [ { name: "x" data_type: TYPE_FP16 dims: [ 2, -1 ] } ] '
        "dynamic_batching { priority_levels: 2 default_priority_level: 1 }",
        "cfg",
    )
    wire = grpc_service_pb2.ModelConfigResponse(config=config).SerializeToString()
    theirs = service_pb2.ModelConfigResponse.FromString(wire).config
    assert theirs.max_batch_size == 3
    assert theirs.input[0].name == "x" and list(theirs.input[0].dims) == [2, -1]
    assert theirs.dynamic_batching.priority_levels == 2
    # and back
    ours = grpc_service_pb2.ModelConfigResponse.FromString(
        service_pb2.ModelConfigResponse(config=theirs).SerializeToString()
    )
    assert ours.config == config
