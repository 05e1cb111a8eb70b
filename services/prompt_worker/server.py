"""Kept for compatibility: the servicer is services.worker.prompt_servicer's."""

from services.worker.prompt_servicer import PromptWorkerServicer

__all__ = ["PromptWorkerServicer"]
