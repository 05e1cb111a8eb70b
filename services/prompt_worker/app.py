"""Kept for compatibility: use services.worker.app (start and serve take a PromptWorkerConfig as they did)."""

import sys

from services.worker import app
from services.worker.app import serve, start

__all__ = ["main", "serve", "start"]


def main(argv=None) -> None:
    app.main([*(sys.argv[1:] if argv is None else argv), "--role", "prompt"])
