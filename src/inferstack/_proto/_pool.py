"""A descriptor pool of our own for the ``inference.*`` protobuf messages.

NVIDIA's ``tritonclient.grpc`` registers the same message names
(``inference.ModelConfig`` ...) in protobuf's process-wide default pool; if
ours went there too, importing both in one process would fail with
"duplicate symbol". ``scripts/gen_proto.sh`` points the generated modules at
this pool instead, so inferstack and tritonclient can share a process (tests,
notebooks, an application embedding the server). The wire format is
unchanged.
"""

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
