"""`splitwise profile`'s options, apart from the profiler itself: the CLI builds them without importing torch."""

from __future__ import annotations

import argparse

from splitwise.config import TokenWorkerConfig, add_config_arguments

# The token worker's options that decide what an engine step costs or how much KV it holds.
WORKER_OPTIONS = ("model", "cache_dir", "device", "dtype", "num_threads", "kv_memory_bytes", "block_size",
                  "max_batch_tokens", "max_decode_batch")
PROMPT_SIZES = (16, 32, 64, 128, 256, 512, 1024, 2048)
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)
QUICK_PROMPT_SIZES = (16, 64)
QUICK_BATCH_SIZES = (1, 4)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, TokenWorkerConfig, WORKER_OPTIONS, strict=False)
    parser.add_argument("--hardware", default="", help="the profile's hardware label (default: cpu-<threads>cores, "
                        "or the CUDA device's name)")
    parser.add_argument("--out", default="", help="the profile CSV (its sidecar goes beside it, .json) "
                        "(default: profiles/<model>-<hardware>.csv)")
    parser.add_argument("--quick", action="store_true", help=f"only batches of {QUICK_BATCH_SIZES} prompts of "
                        f"{QUICK_PROMPT_SIZES} tokens (a check that it runs)")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each prefill, decode steps of each batch; "
                        "the medians are kept (default: 5)")
    parser.add_argument("--prompt-sizes", type=_sizes, default=None, metavar="N,N,...",
                        help=f"prompt tokens (default: {','.join(map(str, PROMPT_SIZES))}; beyond the context window, the "
                             "longest that fits)")
    parser.add_argument("--batch-sizes", type=_sizes, default=None, metavar="N,N,...",
                        help=f"prompts in a batch (default: {','.join(map(str, BATCH_SIZES))})")
    parser.add_argument("--link-bytes-per-s", type=float, default=None,
                        help="the KV link's bandwidth to record in the sidecar (default: none; the simulator then "
                             "takes shared memory's on the 2-core VM)")


def _sizes(text: str) -> tuple[int, ...]:
    sizes = tuple(int(s) for s in text.split(",") if s.strip())
    if not sizes or min(sizes) <= 0:
        raise argparse.ArgumentTypeError(f"sizes must be positive integers, got {text!r}")
    return sizes
