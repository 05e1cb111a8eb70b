"""`splitwise up`, run as a user runs it, keeps its cluster serving when one of its services dies.

A token worker is SIGKILLed under 20 greedy streams: every stream completes, identical to the run without the failure;
the launcher restarts the worker on its address and worker id, it registers again, and `splitwise status` shows the
restart. Redis and the scheduler are restarted too, and the workers register in the new Redis. A worker that cannot
start is given up on after a few tries, and with no worker left for its phase `up` stops with an error. And
`up --mixed-workers` runs colocated workers, every service on the metrics endpoint the listing prints.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import grpc
import pytest

from splitwise.client import SplitwiseClient
from splitwise.launcher import free_port_ranges
from splitwise.model.weights import resolve_model
from splitwise.security.keys import ADMIN_KEY_FILE, API_KEY_FILE
from splitwise.supervision import read_state
from tests.e2e.launched_cluster import HEARTBEAT_S, run_streams
from tests.reference import assert_same_greedy_output, hf_greedy

pytestmark = pytest.mark.e2e

SPLITWISE = Path(sys.executable).parent / "splitwise"
STREAMS = 20
MAX_TOKENS = 200  # long enough that the kill lands while the streams are decoding
STARTUP_S = 180.0
REGISTRY_TTL_S = 3.0  # the workers' default SPLITWISE_REGISTRY_TTL_S


class Up:
    """A running `splitwise up` process: what it printed, and what a client needs, read from its output and run dir."""

    def __init__(self, proc: subprocess.Popen, run_dir: Path):
        self.proc = proc
        self.run_dir = run_dir
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for_line(self, pattern: str, timeout_s: float) -> re.Match:
        deadline = time.monotonic() + timeout_s
        while True:
            for line in list(self.lines):
                if match := re.search(pattern, line):
                    return match
            if self.proc.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        pytest.fail(f"`splitwise up` printed no line matching {pattern!r}:\n{self.output}\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted((self.run_dir / "logs").glob("*.log")))

    @property
    def address(self) -> str:
        return self.wait_for_line(r"splitwise generate --address (\S+)", 0).group(1)

    @property
    def listing(self) -> dict[str, dict[str, str]]:
        """The endpoint listing printed once healthy: service -> its address, pid and metrics URL."""
        services = {}
        for line in self.lines:
            if match := re.match(r"\s+(\S+)\s+(\S+)\s+pid (\d+)\s+metrics (\S+)", line):
                name, address, pid, metrics = match.groups()
                services[name] = {"address": address, "pid": pid, "metrics": metrics}
        return services

    def client_options(self) -> dict[str, str]:
        """The keys `up` keeps in its run dir, where it keeps them (else the client reads the environment)."""
        keys = {"api_key": self.run_dir / API_KEY_FILE, "admin_key": self.run_dir / ADMIN_KEY_FILE}
        return {name: path.read_text().strip() for name, path in keys.items() if path.exists()}

    def client(self) -> SplitwiseClient:
        return SplitwiseClient(self.address, **self.client_options())

    def supervised(self, name: str) -> dict:
        state = read_state(self.run_dir)
        assert state is not None, f"`splitwise up` wrote no supervision state in {self.run_dir}"
        return next(s for s in state["services"] if s["name"] == name)


def start_up(run_dir: Path, cache_dir: Path, *flags: str, metrics_port: int = 0, **env: str) -> Up:
    """Runs `splitwise up` (tiny model, CPU) on free ports, with env on top of this process's."""
    resolve_model("tiny-llama", cache_dir)
    scheduler, prompt, token, kv_store, mixed, redis, http = free_port_ranges(1, 2, 2, 1, 2, 1, 1)
    argv = [str(SPLITWISE), "up", "--model", "tiny-llama", "--device", "cpu", "--run-dir", str(run_dir),
            "--port", str(scheduler), "--prompt-port", str(prompt), "--token-port", str(token),
            "--kv-store-port", str(kv_store), "--mixed-port", str(mixed), "--redis-port", str(redis),
            "--http-port", str(http), "--metrics-port", str(metrics_port), *flags]
    env = {**os.environ, "SPLITWISE_CACHE_DIR": str(cache_dir), "SPLITWISE_NUM_THREADS": "1",
           "SPLITWISE_HEARTBEAT_S": str(HEARTBEAT_S), **env}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            stdin=subprocess.DEVNULL)
    return Up(proc, run_dir)


@contextmanager
def splitwise_up(run_dir: Path, cache_dir: Path, *flags: str, metrics_port: int = 0) -> Iterator[Up]:
    """`splitwise up` healthy on entry; stopped with SIGTERM on exit, which it must obey."""
    up = start_up(run_dir, cache_dir, *flags, metrics_port=metrics_port)
    proc = up.proc
    try:
        up.wait_for_line(r"Ctrl-C stops everything", STARTUP_S)
        yield up
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail(f"`splitwise up` did not stop within 60 s of SIGTERM:\n{up.output}")
    assert code == 0, f"`splitwise up` exited with {code}:\n{up.output}"


async def workers_listed(up: Up) -> dict[str, str]:
    async with up.client() as client:
        status = await client.cluster_status()
    return {w.worker_id: w.address for w in status.workers}


async def restarted_service(up: Up, name: str, restarts: int, timeout_s: float = 60.0) -> dict:
    """The supervision state of `name` once its launcher has restarted it `restarts` times and it runs."""
    deadline = time.monotonic() + timeout_s
    while (state := up.supervised(name))["restarts"] < restarts or state["state"] != "running":
        assert time.monotonic() < deadline, f"{name} was not restarted: {state}\n{up.output}\n{up.logs()}"
        await asyncio.sleep(0.2)
    return state


async def test_sigkill_of_a_token_worker_loses_no_stream_and_up_brings_the_worker_back(tmp_path, cache_dir):
    rng = random.Random(11)
    prompts = [[rng.randrange(3, 250) for _ in range(rng.randrange(8, 90))] for _ in range(STREAMS)]
    with splitwise_up(tmp_path, cache_dir, "--token-workers", "2") as up:
        victim = up.supervised("token_worker-0")
        assert (victim["state"], victim["restarts"]) == ("running", 0)
        assert str(victim["pid"]) == up.listing["token_worker-0"]["pid"]
        options = up.client_options()
        references = await run_streams(up.address, prompts, MAX_TOKENS, **options)
        killed_at = []

        def kill() -> None:
            os.kill(victim["pid"], signal.SIGKILL)
            killed_at.append(time.monotonic())

        outputs = await run_streams(up.address, prompts, MAX_TOKENS, kill=kill, **options)
        folder = resolve_model("tiny-llama", cache_dir)[1]
        for i, (prompt, output, reference) in enumerate(zip(prompts, outputs, references)):
            assert_same_greedy_output(folder, prompt, output, reference, what=f"stream {i}")

        restarted = await restarted_service(up, "token_worker-0", 1)
        # Back in the registry: a fresh heartbeat from token_worker-0 once the dead process's entry has expired is
        # the new process's.
        deadline = time.monotonic() + 60
        while True:
            async with up.client() as client:
                listed = {w.worker_id: w for w in (await client.cluster_status()).workers}
            worker = listed.get("token_worker-0")
            if (time.monotonic() > killed_at[0] + REGISTRY_TTL_S + 1 and worker is not None
                    and worker.heartbeat_age_s < REGISTRY_TTL_S):
                break
            assert time.monotonic() < deadline, f"token_worker-0 is not back: {listed}\n{up.output}\n{up.logs()}"
            await asyncio.sleep(0.2)
        assert worker.address == victim["address"]
        assert restarted["state"] == "running" and restarted["last_exit_code"] == -signal.SIGKILL
        assert restarted["pid"] != victim["pid"] and restarted["address"] == victim["address"]
        assert up.proc.poll() is None, f"`splitwise up` stopped:\n{up.output}"
        assert "token_worker-0 exited with code -9" in up.output and "token_worker-0 restarted" in up.output

        # The restarted worker serves: the same prompts once more, identical again (up to genuine near-ties).
        again = await run_streams(up.address, prompts, MAX_TOKENS, **options)
        for i, (prompt, output, reference) in enumerate(zip(prompts, again, references)):
            assert_same_greedy_output(folder, prompt, output, reference, what=f"stream {i} after the restart")

        status = subprocess.run([str(SPLITWISE), "status", "--address", up.address, "--run-dir", str(tmp_path)],
                                capture_output=True, text=True, timeout=60, env={**os.environ, **{
                                    f"SPLITWISE_{k.upper()}": v for k, v in options.items()}})
        assert status.returncode == 0, status.stderr
        supervision = status.stdout.split("supervised by splitwise up", 1)[-1].splitlines()
        row = next(line.split() for line in supervision if line.strip().startswith("token_worker-0 "))
        assert row[:5] == ["token_worker-0", "running", str(restarted["pid"]), "1", "-9"], status.stdout


async def test_mixed_workers_run_both_phases_and_every_service_serves_metrics_where_up_says(tmp_path, cache_dir):
    (metrics_port,) = free_port_ranges(42)  # the kinds' offsets go up to mixed worker 1 at +41
    with splitwise_up(tmp_path, cache_dir, "--prompt-workers", "0", "--token-workers", "0", "--mixed-workers", "2",
                      metrics_port=metrics_port) as up:
        async with up.client() as client:
            status = await client.cluster_status()
            assert sorted((w.worker_id, w.role) for w in status.workers) == [
                ("mixed_worker-0", "mixed"), ("mixed_worker-1", "mixed")]
            prompt = [5 + i % 200 for i in range(40)]
            out = await client.generate(token_ids=prompt, max_tokens=16, ignore_eos=True, timeout=120)
        expected = hf_greedy(resolve_model("tiny-llama", cache_dir)[1], prompt, 16)  # up to its end of sequence
        assert out.token_ids[: len(expected)] == expected
        listing = up.listing
        assert set(listing) == {"kv_store", "mixed_worker-0", "mixed_worker-1", "scheduler", "gateway"}
        assert listing["mixed_worker-1"]["metrics"] == f"http://127.0.0.1:{metrics_port + 41}/metrics"
        assert listing["kv_store"]["metrics"] == f"http://127.0.0.1:{metrics_port + 30}/metrics"
        for name, service in listing.items():
            with urllib.request.urlopen(service["metrics"], timeout=10) as reply:
                assert reply.status == 200 and b"# TYPE" in reply.read(), name


async def test_up_restarts_its_redis_and_its_scheduler_and_the_workers_register_in_the_new_redis(tmp_path, cache_dir):
    prompt = [9 + i % 100 for i in range(30)]
    with splitwise_up(tmp_path, cache_dir) as up:
        options = up.client_options()
        async with up.client() as client:
            before = await client.generate(token_ids=prompt, max_tokens=12, ignore_eos=True, timeout=60)
        os.kill(up.supervised("redis")["pid"], signal.SIGKILL)
        redis = await restarted_service(up, "redis", 1)
        assert redis["last_exit_code"] == -signal.SIGKILL
        # A restarted scheduler knows only what the new (empty) Redis holds: the workers it lists registered there.
        os.kill(up.supervised("scheduler")["pid"], signal.SIGKILL)
        await restarted_service(up, "scheduler", 1)
        deadline = time.monotonic() + 60
        while True:
            try:
                workers = await workers_listed(up)
            except grpc.aio.AioRpcError:  # the new scheduler is not serving yet
                workers = {}
            if set(workers) == {"prompt_worker-0", "token_worker-0"}:
                break
            assert time.monotonic() < deadline, f"workers listed: {workers}\n{up.output}\n{up.logs()}"
            await asyncio.sleep(0.2)
        outputs = await run_streams(up.address, [prompt], 12, **options)
        assert outputs == [before.token_ids]
        assert up.proc.poll() is None


async def test_up_gives_up_on_a_worker_that_cannot_start_and_stops_when_its_phase_has_no_worker(tmp_path, cache_dir):
    up = start_up(tmp_path, cache_dir, SPLITWISE_KV_MEMORY_BYTES="lots")  # the token worker exits at start
    try:
        code = up.proc.wait(STARTUP_S)
    except subprocess.TimeoutExpired:
        up.proc.kill()
        pytest.fail(f"`splitwise up` went on without a token worker:\n{up.output}")
    up._reader.join(10)
    assert code == 1, up.output
    assert up.output.count("token_worker-0 exited with code 1") == 5, up.output
    assert "token_worker-0 kept exiting" in up.output and "no worker is left for the token phase" in up.output
    assert "restarting it in 0.5 s" in up.output and "restarting it in 4.0 s" in up.output
    assert "cluster healthy" not in up.output
