"""A worker: runs the prompt phase, the token phase, or both (--role prompt, token or mixed) on one engine."""
