"""Generated gRPC stubs of the splitwise.v1 contract."""
