"""Kept for compatibility: use python -m services.worker --role prompt."""

from services.prompt_worker.app import main

main()
