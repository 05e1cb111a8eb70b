"""Benchmarks: programs run on demand that print ratios measured side by side in one run."""
