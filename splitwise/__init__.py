"""splitwise: phase-split LLM serving (prompt and token phases on separate workers)."""

__version__ = "0.1.0"
