"""Worker pinning: each worker process gets its own share of the cores, set before the service starts."""

import os

import pytest

from splitwise.launcher import Cluster, UpOptions, worker_cores


def test_workers_get_disjoint_equal_shares_while_there_are_enough_cores():
    cores = list(range(8))
    shares = [worker_cores(i, 4, cores) for i in range(4)]
    assert shares == [{0, 1}, {2, 3}, {4, 5}, {6, 7}]
    assert [worker_cores(i, 3, cores) for i in range(3)] == [{0, 1}, {2, 3}, {4, 5}]


def test_more_workers_than_cores_take_one_core_each_in_turn():
    assert [worker_cores(i, 3, [4, 5]) for i in range(3)] == [{4}, {5}, {4}]


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this platform")
def test_a_pinned_service_runs_on_its_cores_only(tmp_path):
    core = sorted(os.sched_getaffinity(0))[-1]
    cluster = Cluster(UpOptions(model="tiny-llama", run_dir=tmp_path, metrics_port=0))
    cluster._spawn("probe-0", "tests.affinity_probe", {}, None, {core})
    cluster._spawn("probe-1", "tests.affinity_probe", {}, None)
    assert [c.proc.wait(30) for c in cluster.children] == [0, 0]
    logs = {c.name: (tmp_path / "logs" / f"{c.name}.log").read_text().strip().splitlines()[-1] for c in cluster.children}
    assert logs["probe-0"] == str([core])
    assert logs["probe-1"] == str(sorted(os.sched_getaffinity(0)))
