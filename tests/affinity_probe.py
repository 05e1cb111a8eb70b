"""Prints the cores this process may run on (launched by the launcher's pinning test)."""

import os

print(sorted(os.sched_getaffinity(0)), flush=True)
