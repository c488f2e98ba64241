"""Network front ends: the HTTP/REST app (and, later, gRPC) over the serving core."""
