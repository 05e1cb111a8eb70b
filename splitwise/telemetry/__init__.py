"""Telemetry: OpenTelemetry tracing setup, W3C context over gRPC metadata, JSON-lines span export."""
