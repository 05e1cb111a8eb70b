"""Kept for compatibility: the servicer is services.worker.token's."""

from services.worker.token import TokenWorkerServicer

__all__ = ["TokenWorkerServicer"]
