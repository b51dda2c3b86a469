"""A fake Kubernetes API server speaking the real list/watch HTTP protocol, for source tests."""

from .server import FakeApiServer, Request

__all__ = ["FakeApiServer", "Request"]
