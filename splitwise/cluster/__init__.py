"""Cluster: the worker registry in Redis and the routing policies (pure functions)."""
