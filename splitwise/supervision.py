"""How `splitwise up` keeps its services running: a dead one is restarted after a capped exponential backoff, and
what happened is written to a state file in the run dir that `splitwise status` prints.

A service counts as crash-looping while each of its runs ends before `healthy_after_s`; after `give_up_after` such
runs in a row the launcher stops restarting it. A run that lasted longer resets the backoff.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

STATE_FILE = "supervision.json"


@dataclass(frozen=True)
class RestartPolicy:
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 15.0
    healthy_after_s: float = 30.0  # a run this long is not part of a crash loop
    give_up_after: int = 5  # short runs in a row

    def backoff_s(self, short_runs: int) -> float:
        """The wait before restarting a service whose last `short_runs` runs (at least 1) were all short."""
        return min(self.max_backoff_s, self.initial_backoff_s * 2 ** max(0, short_runs - 1))


@dataclass
class ServiceState:
    """What `splitwise status` shows of one supervised service."""

    name: str
    address: str
    pid: int | None
    state: str = "running"  # running | restarting | given up
    restarts: int = 0
    last_exit_code: int | None = None
    last_exit_unix_s: float | None = None


@dataclass
class Supervised:
    """A service the supervisor watches: its current process and how to start it again."""

    name: str
    address: str
    process: Callable[[], subprocess.Popen | None]
    restart: Callable[[], None]  # raises RuntimeError when the new process could not be started
    state: ServiceState = field(init=False)
    started_at: float = field(default_factory=time.monotonic)
    short_runs: int = 0
    restart_at: float | None = None

    def __post_init__(self):
        proc = self.process()
        self.state = ServiceState(self.name, self.address, proc.pid if proc else None)


class ServiceLost(RuntimeError):
    """The supervisor gave up on services without which nothing can serve."""


class Supervisor:
    """Checked every few hundred milliseconds by the launcher's loop: notices deaths, restarts when their backoff is
    over, and rewrites the state file on every change."""

    def __init__(self, services: list[Supervised], policy: RestartPolicy, run_dir: Path,
                 essential: Callable[[set[str]], str | None], log=None):
        self.services = services
        self.policy = policy
        self.path = run_dir / STATE_FILE
        self.essential = essential  # given the names given up on: why nothing can serve now, or None
        self.log = log or (lambda message: print(message, file=sys.stderr, flush=True))
        self.write()

    def check(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        changed = False
        for s in self.services:
            if s.state.state == "given up":
                continue
            if s.restart_at is None:
                proc = s.process()
                if proc is not None and proc.poll() is not None:
                    self._died(s, proc.returncode, now)
                    changed = True
            elif now >= s.restart_at:
                self._restart(s, now)
                changed = True
        if changed:
            self.write()
            given_up = {s.name for s in self.services if s.state.state == "given up"}
            reason = self.essential(given_up) if given_up else None
            if reason:
                raise ServiceLost(reason)

    def _died(self, s: Supervised, code: int, now: float) -> None:
        ran_s = now - s.started_at
        s.short_runs = s.short_runs + 1 if ran_s < self.policy.healthy_after_s else 1
        s.state.last_exit_code, s.state.last_exit_unix_s = code, time.time()
        if s.short_runs >= self.policy.give_up_after:
            s.state.state, s.state.pid = "given up", None
            self.log(f"{s.name} exited with code {code} after {ran_s:.1f} s, its {s.short_runs}th short run in a "
                     "row; not restarting it")
            return
        delay_s = self.policy.backoff_s(s.short_runs)
        s.state.state, s.restart_at = "restarting", now + delay_s
        self.log(f"{s.name} exited with code {code} after {ran_s:.1f} s; restarting it in {delay_s:.1f} s")

    def _restart(self, s: Supervised, now: float) -> None:
        s.restart_at = None
        s.started_at = now
        s.state.restarts += 1
        try:
            s.restart()
        except RuntimeError as e:  # counts as a run that ended at once
            self.log(f"{s.name} could not be restarted: {e}")
            self._died(s, -1, now)
            return
        proc = s.process()
        s.state.state, s.state.pid = "running", proc.pid if proc else None
        self.log(f"{s.name} restarted (restart {s.state.restarts}, pid {s.state.pid})")

    def write(self) -> None:
        state = {"launcher_pid": os.getpid(), "updated_unix_s": time.time(),
                 "services": [asdict(s.state) for s in self.services]}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, self.path)  # a reader never sees half a file


def read_state(run_dir: Path) -> dict | None:
    """The state a running launcher wrote in run_dir, or None when there is none or its launcher is gone."""
    try:
        state = json.loads((run_dir / STATE_FILE).read_text())
        os.kill(state["launcher_pid"], 0)
    except (OSError, ValueError, KeyError):
        return None
    return state


def format_state(state: dict) -> list[str]:
    lines = [f"supervised by splitwise up (pid {state['launcher_pid']}):",
             f"  {'service':<18} {'state':<10} {'pid':>8} {'restarts':>8} {'last exit':>9}  address"]
    for s in state["services"]:
        code = "" if s["last_exit_code"] is None else str(s["last_exit_code"])
        pid = "" if s["pid"] is None else str(s["pid"])
        lines.append(f"  {s['name']:<18} {s['state']:<10} {pid:>8} {s['restarts']:>8} {code:>9}  {s['address']}")
    return lines
