"""gRPC edge: generated stubs (v1/) and the only code that converts protobuf to and from dataclasses."""
