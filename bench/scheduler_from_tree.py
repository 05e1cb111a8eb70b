"""The scheduler as another source tree has it (a git ref unpacked by bench.scheduler_cpu): its directory goes first
on sys.path, so `services` and `splitwise` are imported from there. Run in place of services.scheduler."""

import os
import runpy
import sys

sys.path.insert(0, os.environ["SPLITWISE_BENCH_SCHEDULER_TREE"])
runpy.run_module("services.scheduler", run_name="__main__", alter_sys=True)
