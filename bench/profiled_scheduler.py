"""The scheduler with its main thread (the event loop) under cProfile, stats written to $SPLITWISE_BENCH_CPROFILE
when it stops: what `python -m bench.mock_cluster --cprofile FILE` runs in place of services.scheduler."""

import cProfile
import os

from services.scheduler.app import main

profiler = cProfile.Profile()
profiler.enable()
try:
    main()
finally:
    profiler.disable()
    profiler.dump_stats(os.environ["SPLITWISE_BENCH_CPROFILE"])
