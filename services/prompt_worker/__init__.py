"""Kept for compatibility: the prompt worker is services.worker with --role prompt."""
