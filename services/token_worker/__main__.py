"""Kept for compatibility: use python -m services.worker --role token (or mixed)."""

from services.token_worker.app import main

main()
