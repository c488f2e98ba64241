"""``inferstack perf``: a perf_analyzer for any KServe v2 server, over HTTP or gRPC.

* :mod:`~inferstack.perf.clients`: the load-generating clients (raw keep-alive
  HTTP/1.1 with :class:`RawConnection`, gRPC on grpc.aio) and the metadata /
  statistics calls around the load;
* :mod:`~inferstack.perf.inputs`: request bodies from the model's metadata;
* :mod:`~inferstack.perf.engine`: concurrency and request-rate levels,
  measurement windows, stability, worker processes;
* :mod:`~inferstack.perf.report`: table, CSV, JSON and plot;
* :mod:`~inferstack.perf.runner`: the command (``docs/perf.md``).

This package is a client: it imports ``core`` (datatypes) and ``_proto``, never
the server.
"""

from inferstack.perf.clients import (
    GrpcClient,
    HttpClient,
    PerfSetupError,
    RawConnection,
    ServerStats,
    build_request,
)

__all__ = [
    "GrpcClient",
    "HttpClient",
    "PerfSetupError",
    "RawConnection",
    "ServerStats",
    "build_request",
]
