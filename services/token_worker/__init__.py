"""Kept for compatibility: the token worker is services.worker with --role token (or mixed)."""
