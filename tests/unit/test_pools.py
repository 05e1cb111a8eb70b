"""Pool transitions as a pure function of the observed load: borrow into the mixed pool, give back, never
the last worker of a pool, no change within the cooldown."""

import json
from dataclasses import asdict

from splitwise.cluster.pools import PoolPolicy, plan, with_pools
from splitwise.cluster.registry import WorkerInfo

POLICY = PoolPolicy(prompt_borrow_tokens=1000, token_borrow_kv_fraction=0.8, cooldown_s=5)


def worker(worker_id: str, role: str, pending: int = 0, used: int = 0, capacity: int = 1000) -> WorkerInfo:
    return WorkerInfo(worker_id, role, f"{worker_id}:1", "m", "fp", pending_tokens=pending,
                      kv_capacity_tokens=capacity, kv_used_tokens=used)


def test_a_busy_prompt_pool_borrows_the_token_worker_with_the_least_kv_in_use():
    workers = [worker("p0", "prompt", pending=1500), worker("p1", "prompt", pending=1200),
               worker("t0", "token", used=500), worker("t1", "token", used=100)]
    change = plan(workers, {}, POLICY, {}, now=100, last_change=0)
    assert (change.worker_id, change.from_pool, change.to_pool) == ("t1", "token", "mixed")
    assert "prompt pool busy" in change.reason
    routed = {w.worker_id: w.role for w in with_pools(workers, {"t1": "mixed"})}
    assert routed == {"p0": "prompt", "p1": "prompt", "t0": "token", "t1": "mixed"}


def test_one_idle_prompt_worker_means_the_pool_is_not_busy():
    workers = [worker("p0", "prompt", pending=5000), worker("p1", "prompt", pending=10),
               worker("t0", "token"), worker("t1", "token")]
    assert plan(workers, {}, POLICY, {}, 100, 0) is None
    # ... unless this scheduler has just sent it more than the threshold
    assert plan(workers, {}, POLICY, {"p1": 2000}, 100, 0).to_pool == "mixed"


def test_a_busy_token_pool_borrows_the_least_loaded_prompt_worker():
    workers = [worker("p0", "prompt", pending=300), worker("p1", "prompt", pending=20),
               worker("t0", "token", used=900), worker("t1", "token", used=850)]
    change = plan(workers, {}, POLICY, {}, 100, 0)
    assert (change.worker_id, change.from_pool, change.to_pool) == ("p1", "prompt", "mixed")


def test_a_pools_last_worker_can_be_lent_since_the_mixed_pool_serves_its_phase_too():
    workers = [worker("p0", "prompt", pending=5000), worker("t0", "token")]
    assert plan(workers, {}, POLICY, {}, 100, 0).worker_id == "t0"
    workers = [worker("p0", "prompt"), worker("t0", "token", used=990)]
    assert plan(workers, {}, POLICY, {}, 100, 0).worker_id == "p0"
    # Both pools busy: nobody is lent.
    workers = [worker("p0", "prompt", pending=5000), worker("t0", "token", used=990)]
    assert plan(workers, {}, POLICY, {}, 100, 0) is None


def test_a_borrowed_worker_goes_home_once_the_borrowing_pool_drained_below_half():
    workers = [worker("p0", "prompt", pending=700), worker("t0", "token"), worker("t1", "token")]
    assert plan(workers, {"t1": "mixed"}, POLICY, {}, 100, 0) is None  # 700: not yet below half of 1000
    workers[0] = worker("p0", "prompt", pending=400)
    change = plan(workers, {"t1": "mixed"}, POLICY, {}, 100, 0)
    assert (change.worker_id, change.from_pool, change.to_pool) == ("t1", "mixed", "token")
    workers = [worker("p0", "prompt"), worker("p1", "prompt"), worker("t0", "token", used=300)]
    assert plan(workers, {"p1": "mixed"}, POLICY, {}, 100, 0).to_pool == "prompt"


def test_no_change_within_the_cooldown_and_none_when_borrowing_is_off():
    workers = [worker("p0", "prompt", pending=1500), worker("t0", "token"), worker("t1", "token")]
    assert plan(workers, {}, POLICY, {}, now=103, last_change=100) is None
    assert plan(workers, {}, POLICY, {}, now=106, last_change=100) is not None
    assert plan(workers, {}, PoolPolicy(prompt_borrow_tokens=0), {}, 106, 0) is None


def test_declared_mixed_workers_stay_mixed():
    workers = [worker("p0", "prompt", pending=1500), worker("m0", "mixed")]
    assert plan(workers, {}, POLICY, {}, 100, 0) is None  # no token-pool worker to lend; m0 is no borrowed one
    assert plan(workers, {"m0": "mixed"}, POLICY, {}, 100, 0) is None  # and never "given back"


def test_a_stray_pool_transition_entry_is_skipped_not_fatal():
    from splitwise.cluster.pools import Transition, parse_transition

    good = Transition("token-a", "token", "mixed", "busy", 12.5)
    assert parse_transition(json.dumps(asdict(good))) == good
    for junk in (b"not a transition", "[]", "{}", json.dumps({**asdict(good), "at": "soon"}),
                 json.dumps({**asdict(good), "worker_id": 5}), json.dumps({**asdict(good), "extra": 1}), "null"):
        assert parse_transition(junk) is None, junk
