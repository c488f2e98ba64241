"""Transport-neutral core types: datatypes, requests, responses, errors.

Nothing in this package knows about HTTP, gRPC or a particular backend; every
other layer depends on it and it depends on nothing but numpy.
"""
