"""The four splitwise services, each a thin process: config -> core objects -> gRPC server."""
