"""How `splitwise up` restarts its services: a dead one after a capped exponential backoff, a crash loop given up on,
the cluster stopped only when nothing can serve, and every step in the state file `splitwise status` prints."""

import dataclasses
import json
import subprocess
import sys

import pytest

from splitwise.supervision import (STATE_FILE, RestartPolicy, ServiceLost, Supervised, Supervisor, format_state,
                                   read_state)

POLICY = RestartPolicy(initial_backoff_s=0.5, max_backoff_s=4.0, healthy_after_s=30.0, give_up_after=3)


class Service:
    """A real process standing for a service: it exits with `code` as soon as it starts."""

    def __init__(self, code: int = 3):
        self.code = code
        self.starts = 0
        self.proc = None
        self.restart()

    def restart(self) -> None:
        self.starts += 1
        self.proc = subprocess.Popen([sys.executable, "-c", f"import sys; sys.exit({self.code})"])
        self.proc.wait(30)

    def supervised(self, name: str) -> Supervised:
        return Supervised(name, f"127.0.0.1:{5000 + len(name)}", lambda: self.proc, self.restart)


def state(tmp_path) -> dict:
    return {s["name"]: s for s in json.loads((tmp_path / STATE_FILE).read_text())["services"]}


def test_backoff_doubles_from_the_initial_wait_up_to_the_cap():
    assert [POLICY.backoff_s(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 4.0, 4.0]


def test_a_dead_service_is_restarted_once_its_backoff_is_over_and_the_state_file_says_so(tmp_path):
    service = Service()
    supervised = service.supervised("token_worker-0")
    supervisor = Supervisor([supervised], POLICY, tmp_path, lambda given_up: None, log=lambda _: None)
    start = supervised.started_at
    supervisor.check(start + 1.0)
    assert state(tmp_path)["token_worker-0"] | {"last_exit_unix_s": None} == {
        "name": "token_worker-0", "address": "127.0.0.1:5014", "pid": service.proc.pid, "state": "restarting",
        "restarts": 0, "last_exit_code": 3, "last_exit_unix_s": None}
    supervisor.check(start + 1.4)  # the backoff (0.5 s) is not over
    assert service.starts == 1
    supervisor.check(start + 1.6)
    assert service.starts == 2
    restarted = state(tmp_path)["token_worker-0"]
    assert (restarted["state"], restarted["restarts"], restarted["pid"]) == ("running", 1, service.proc.pid)


def test_each_short_run_in_a_row_doubles_the_wait_and_a_long_run_resets_it(tmp_path):
    service = Service()
    supervised = service.supervised("kv_store")
    supervisor = Supervisor([supervised], dataclasses.replace(POLICY, give_up_after=10), tmp_path, lambda given_up: None, log=lambda _: None)
    now = supervised.started_at + 1.0
    waits = []
    for run_s in (0.0, 1.0, 60.0):  # how long each restarted run lasts before it is seen dead
        supervisor.check(now)
        waits.append(supervised.restart_at - now)
        now = supervised.restart_at
        supervisor.check(now)  # restarted
        now += run_s
    supervisor.check(now)
    waits.append(supervised.restart_at - now)
    assert waits == [0.5, 1.0, 2.0, 0.5]


def test_a_service_that_keeps_dying_young_is_given_up_and_the_others_serve_on(tmp_path):
    looping, steady = Service(), Service(code=0)
    steady.proc = subprocess.Popen(["sleep", "60"])
    messages = []
    supervisor = Supervisor([looping.supervised("prompt_worker-1"), steady.supervised("prompt_worker-0")], POLICY,
                            tmp_path, lambda given_up: None, log=messages.append)
    try:
        now = supervisor.services[0].started_at
        for _ in range(10):
            now += 5.0
            supervisor.check(now)
        assert looping.starts == POLICY.give_up_after  # the first start and two restarts
        gave_up = state(tmp_path)["prompt_worker-1"]
        assert (gave_up["state"], gave_up["pid"], gave_up["last_exit_code"]) == ("given up", None, 3)
        assert state(tmp_path)["prompt_worker-0"]["state"] == "running"
        assert "not restarting it" in messages[-1]
    finally:
        steady.proc.kill()
        steady.proc.wait()


def test_the_cluster_stops_when_a_service_it_cannot_do_without_is_given_up(tmp_path):
    service = Service()
    supervisor = Supervisor([service.supervised("redis")], POLICY, tmp_path,
                            lambda given_up: "its Redis is gone" if "redis" in given_up else None, log=lambda _: None)
    now = supervisor.services[0].started_at
    with pytest.raises(ServiceLost, match="its Redis is gone"):
        for _ in range(10):
            now += 5.0
            supervisor.check(now)


def test_a_restart_that_cannot_start_counts_as_a_short_run(tmp_path):
    service = Service()

    def fails() -> None:
        raise RuntimeError("redis-server did not start on 127.0.0.1:6379 (port in use? choose another)")

    supervised = Supervised("redis", "127.0.0.1:6379", lambda: service.proc, fails)
    supervisor = Supervisor([supervised], POLICY, tmp_path, lambda given_up: None, log=lambda _: None)
    now = supervised.started_at
    supervisor.check(now)
    supervisor.check(now + 0.5)
    assert state(tmp_path)["redis"]["restarts"] == 1 and supervised.restart_at == now + 0.5 + 1.0


def test_status_shows_the_state_of_a_running_launcher_only(tmp_path):
    service = Service()
    supervisor = Supervisor([service.supervised("token_worker-0")], POLICY, tmp_path, lambda given_up: None,
                            log=lambda _: None)
    supervisor.check(supervisor.services[0].started_at + 1.0)
    lines = format_state(read_state(tmp_path))
    assert lines[1].split() == ["service", "state", "pid", "restarts", "last", "exit", "address"]
    assert lines[2].split() == ["token_worker-0", "restarting", str(service.proc.pid), "0", "3", "127.0.0.1:5014"]
    gone = subprocess.Popen(["true"])
    gone.wait()
    written = json.loads((tmp_path / STATE_FILE).read_text())
    (tmp_path / STATE_FILE).write_text(json.dumps({**written, "launcher_pid": gone.pid}))
    assert read_state(tmp_path) is None
