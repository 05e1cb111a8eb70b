"""Prompt worker: runs the prompt phase and ships the KV cache layer by layer."""
