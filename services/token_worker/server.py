"""Kept for compatibility: the servicer is services.worker.token_servicer's."""

from services.worker.token_servicer import TokenWorkerServicer

__all__ = ["TokenWorkerServicer"]
