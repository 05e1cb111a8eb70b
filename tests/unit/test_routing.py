"""Routing policies are pure functions of the observed state: same inputs, same choice."""

import pytest

from splitwise.cluster.registry import WorkerInfo
from splitwise.cluster.routing import ConditionalDisaggregation, NoWorkerAvailable, route, token_phase


def worker(worker_id: str, role: str, pending: int = 0, used: int = 0, capacity: int = 10_000) -> WorkerInfo:
    return WorkerInfo(worker_id, role, f"{worker_id}:1", "m", "fp", pending_tokens=pending,
                      kv_capacity_tokens=capacity, kv_used_tokens=used)


PROMPTS = [worker("p0", "prompt", pending=500), worker("p1", "prompt", pending=100)]
# t0 has the shorter queue but more of its KV memory in use; t1 the reverse.
TOKENS = [worker("t0", "token", pending=10, used=9_000), worker("t1", "token", pending=900, used=1_000)]


def test_cls_joins_the_shortest_prompt_queue_and_the_token_worker_with_the_least_kv_in_use():
    chosen = route(PROMPTS + TOKENS, "m", 100, {}, "cls")
    assert (chosen.prompt_worker.worker_id, chosen.token_worker.worker_id) == ("p1", "t1")


def test_cls_counts_what_this_scheduler_sent_since_the_last_heartbeat():
    chosen = route(PROMPTS + TOKENS, "m", 100, {"p1": 1_000, "t1": 8_500}, "cls")
    assert (chosen.prompt_worker.worker_id, chosen.token_worker.worker_id) == ("p0", "t0")


def test_cls_prompt_phase_counts_queued_prompt_tokens_and_requests_not_the_kv_they_hold():
    # m0 decodes 4 requests with long contexts and has nothing queued; m1 holds less KV but 600 prompt tokens
    # wait there. JSQ on pending tokens (KV held included) would pick m1, behind the 600 tokens.
    m0 = WorkerInfo("m0", "mixed", "m0:1", "m", "fp", pending_tokens=8_000, active_requests=4,
                    kv_capacity_tokens=100_000, kv_used_tokens=8_000)
    m1 = WorkerInfo("m1", "mixed", "m1:1", "m", "fp", pending_tokens=1_600, active_requests=2,
                    kv_capacity_tokens=100_000, kv_used_tokens=1_000)
    assert route([m0, m1], "m", 100, {}, "cls").prompt_worker.worker_id == "m0"
    assert route([m0, m1], "m", 100, {}, "jsq").prompt_worker.worker_id == "m1"
    # what this scheduler sent since the heartbeats counts as queued
    assert route([m0, m1], "m", 100, {"m0": 700}, "cls").prompt_worker.worker_id == "m1"


def test_jsq_joins_the_shortest_queue_for_both_phases():
    chosen = route(PROMPTS + TOKENS, "m", 100, {}, "jsq")
    assert (chosen.prompt_worker.worker_id, chosen.token_worker.worker_id) == ("p1", "t0")


def test_round_robin_takes_turns_by_the_request_number():
    turns = [route(PROMPTS + TOKENS, "m", 100, {}, "round_robin", sequence=n) for n in range(4)]
    assert [(r.prompt_worker.worker_id, r.token_worker.worker_id) for r in turns] == [
        ("p0", "t0"), ("p1", "t1"), ("p0", "t0"), ("p1", "t1")]


def test_random_is_reproducible_from_the_request_number_and_uses_every_worker():
    picks = [route(PROMPTS + TOKENS, "m", 100, {}, "random", sequence=n) for n in range(50)]
    again = [route(PROMPTS + TOKENS, "m", 100, {}, "random", sequence=n) for n in range(50)]
    assert picks == again
    assert {r.prompt_worker.worker_id for r in picks} == {"p0", "p1"}
    assert {r.token_worker.worker_id for r in picks} == {"t0", "t1"}


def test_no_policy_routes_to_a_token_worker_that_could_never_hold_the_request():
    small = [worker("p", "prompt"), worker("t-small", "token", capacity=50), worker("t", "token", used=9_999)]
    for policy in ("cls", "jsq", "round_robin", "random"):
        assert route(small, "m", 100, {}, policy, sequence=0).token_worker.worker_id == "t"
    with pytest.raises(NoWorkerAvailable, match="can hold 100 tokens"):
        route(small[:2], "m", 100, {}, "cls")


def test_an_unknown_policy_is_refused_by_name():
    with pytest.raises(ValueError, match="round_robin"):
        route(PROMPTS + TOKENS, "m", 100, {}, "fastest")


BUSY = ConditionalDisaggregation(max_prompt_tokens=256, busy_pending_tokens=400)


def test_a_short_prompt_is_prefilled_on_its_token_worker_when_the_prompt_pool_is_busy():
    busy = [worker("p0", "prompt", pending=500), worker("p1", "prompt", pending=450)] + TOKENS
    chosen = route(busy, "m", 300, {}, "cls", prompt_tokens=200, conditional=BUSY)
    assert chosen.colocated and chosen.token_worker.worker_id == "t1"


def test_a_long_prompt_or_an_idle_prompt_pool_keeps_the_phases_split():
    busy = [worker("p0", "prompt", pending=500), worker("p1", "prompt", pending=450)] + TOKENS
    assert not route(busy, "m", 600, {}, "cls", prompt_tokens=300, conditional=BUSY).colocated
    assert not route(PROMPTS + TOKENS, "m", 300, {}, "cls", prompt_tokens=200, conditional=BUSY).colocated
    off = ConditionalDisaggregation(max_prompt_tokens=0)
    assert not route(busy, "m", 300, {}, "cls", prompt_tokens=200, conditional=off).colocated


def test_a_mixed_worker_picked_for_both_phases_runs_the_request_colocated():
    chosen = route([worker("mx", "mixed")], "m", 100, {}, "cls")
    assert chosen.colocated and chosen.prompt_worker.worker_id == "mx"


def test_a_request_prefilled_in_the_mixed_pool_stays_on_that_worker():
    # JSQ picks m1 for the prompt (shorter queue), least-KV would pick m2 for tokens: it stays on m1.
    workers = [worker("m1", "mixed", pending=10, used=800), worker("m2", "mixed", pending=500, used=100)]
    chosen = route(workers, "m", 100, {}, "cls")
    assert chosen.colocated and chosen.prompt_worker.worker_id == "m1"
    # ... unless m1 could never hold it: then its KV goes to a worker that can.
    small = [worker("m1", "mixed", pending=10, capacity=50), worker("m2", "mixed", pending=500)]
    chosen = route(small, "m", 100, {}, "cls")
    assert (chosen.prompt_worker.worker_id, chosen.token_worker.worker_id) == ("m1", "m2")


def test_a_resumed_request_goes_to_a_token_worker_by_the_policys_token_rule_without_a_prompt_worker():
    workers = [worker("t1", "token", used=900), worker("t2", "token", used=100, pending=9_000), worker("m", "mixed", used=500),
               worker("small", "token", capacity=50)]
    assert token_phase(workers, "m", 200, {}, "cls").worker_id == "t2"  # least KV in use
    assert token_phase(workers, "m", 200, {}, "jsq").worker_id == "m"  # no pending tokens; ties by id
    assert {token_phase(workers, "m", 200, {}, "round_robin", n).worker_id for n in range(3)} == {"t1", "t2", "m"}
    with pytest.raises(NoWorkerAvailable):
        token_phase([worker("p", "prompt"), worker("small", "token", capacity=50)], "m", 200, {}, "cls")
