"""Token worker: receives KV caches and runs the token phase."""
