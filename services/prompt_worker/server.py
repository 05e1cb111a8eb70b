"""Kept for compatibility: the servicer is services.worker.prompt's."""

from services.worker.prompt import PromptWorkerServicer

__all__ = ["PromptWorkerServicer"]
