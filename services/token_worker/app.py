"""Kept for compatibility: use services.worker.app (its role defaults to SPLITWISE_WORKER_ROLE, else token)."""

from services.worker.app import main, serve, start

__all__ = ["main", "serve", "start"]
