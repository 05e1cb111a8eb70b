"""The scheduler with its main thread (the event loop) under cProfile, stats written to $SPLITWISE_BENCH_CPROFILE
when it stops: what `python -m bench.mock_cluster --cprofile FILE` runs in place of services.scheduler. The
profile's clock is the thread's CPU time, not the wall clock: on a shared host a wall clock charges a function for
the time the process waited for a core."""

import cProfile
import os
import time

from services.scheduler.app import main

profiler = cProfile.Profile(time.thread_time)
profiler.enable()
try:
    main()
finally:
    profiler.disable()
    profiler.dump_stats(os.environ["SPLITWISE_BENCH_CPROFILE"])
