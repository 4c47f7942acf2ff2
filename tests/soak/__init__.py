"""Soak tests: long overload and failure runs against the real server (`make soak`, not `make test`)."""
