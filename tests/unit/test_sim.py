"""The cluster simulator: the live routing, pool and batching code in virtual time; every request ends ok or dropped
with a reason; small traces come out as computed by hand; runs of decode steps computed at once change nothing."""

from __future__ import annotations

import pytest

import splitwise.cluster.pools
import splitwise.cluster.routing
import splitwise.sim.simulator
from splitwise.cluster.pools import PoolPolicy
from splitwise.cluster.routing import ConditionalDisaggregation, Route
from splitwise.config import SchedulerConfig, TokenWorkerConfig
from splitwise.engine.block_manager import BlockManager
from splitwise.engine.llm_engine import EngineConfig
from splitwise.engine.scheduler import BatchScheduler
from splitwise.sim.designs import ClusterDesign, Pool, parse_design
from splitwise.sim.machines import MachineProfile, MachineType, ModelSpec
from splitwise.sim.perf_model import PerfModel
from splitwise.sim.simulator import SimConfig, Simulator, simulate
from splitwise.sim.workload import SimRequest, poisson, trace_lengths

# A toy machine whose step times are easy to add up: a prefill of n tokens takes 0.1 + 0.001 n s, a decode step of
# b sequences 0.009 + 0.001 b s; 2000 bytes of KV per token over a 1 MB/s link; 8992 tokens of KV (562 blocks).
TOY_PERF = PerfModel("toy", "toy-gpu", 1, prompt_points=((1, 0.101), (10_001, 10.101)),
                     token_points=((1, 0.010), (101, 0.110)))
TOY_MODEL = ModelSpec("toy", num_layers=10, num_kv_heads=1, head_dim=50, weights_bytes=0)
TOY_MACHINE = MachineType("toy-machine", "toy-gpu", cost_per_hour=1.0, power_kw=1.0, gpus=1, gpu_memory_bytes=2e7,
                          link_bytes_per_s=1e6)
TOY = MachineProfile(TOY_MACHINE, TOY_MODEL, TOY_PERF)
SPLIT = ClusterDesign("toy-split", (Pool(TOY, "prompt", 1), Pool(TOY, "token", 1)))
COLOCATED = ClusterDesign("toy-colocated", (Pool(TOY, "mixed", 1),))
EXACT = SimConfig(conditional=ConditionalDisaggregation(0), pool_policy=PoolPolicy(0), kv_layerwise_min_tokens=512,
                  per_transfer_s=0.005, view_refresh_s=0)
PREFILL_100 = 0.2  # 0.1 + 0.001 * 100
KV_100 = 100 * 2000 / 1e6  # 0.2 s on the link
DECODE_1, DECODE_2, DECODE_3 = 0.010, 0.011, 0.012


@pytest.fixture(scope="module")
def conv_lengths():
    return trace_lengths("conv")


def by_id(result):
    return {r.request_id: r for r in result.requests}


class WatchedSimulator(Simulator):
    """Records the virtual time of every event it handles and every event it schedules."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.handled: list[float] = []
        self.scheduled: list[tuple[float, float]] = []  # (now, at)

    def _push(self, at, kind, *payload):
        self.scheduled.append((self.now, at))
        super()._push(at, kind, *payload)

    def _arrive(self, state):
        self.handled.append(self.now)
        super()._arrive(state)

    def _step_done(self, machine, run):
        self.handled.append(self.now)
        super()._step_done(machine, run)

    def _kv_arrived(self, state):
        self.handled.append(self.now)
        super()._kv_arrived(state)

    def _retry_backlog(self):
        self.handled.append(self.now)
        super()._retry_backlog()


# -- event-loop invariants -------------------------------------------------------------------------------

@pytest.mark.parametrize("design", ["baseline:2*dgx-a100", "splitwise:1*dgx-a100+1*dgx-a100"])
def test_virtual_time_never_goes_back_and_every_request_ends_ok_or_dropped_with_a_reason(design, conv_lengths):
    requests = poisson(3.0, 15.0, conv_lengths, seed=1) + [SimRequest("huge", 5.0, 2_000_000, 10)]
    sim = WatchedSimulator(parse_design(design), requests)
    result = sim.run()
    assert sim.handled == sorted(sim.handled) and sim.handled[0] >= 0
    assert all(at >= now for now, at in sim.scheduled)
    assert len(result.requests) == len(requests)
    ok = [r for r in result.requests if r.ok]
    dropped = [r for r in result.requests if not r.ok]
    assert len(ok) + len(dropped) == len(requests) and result.dropped == len(dropped)
    assert [r.request_id for r in dropped] == ["huge"]
    assert "no token worker serving this model can hold 2000010 tokens of KV" in dropped[0].error
    for r in ok:
        assert 0 < r.ttft_s <= r.e2e_s
        assert all(gap >= 0 for gap in r.tbt_s) and len(r.tbt_s) == r.output_tokens - 1
        assert r.e2e_s == pytest.approx(r.ttft_s + sum(r.tbt_s), abs=1e-9)
        assert r.arrival_s + r.e2e_s <= result.sim_time_s + 1e-9


def test_the_event_loop_refuses_an_event_in_the_past():
    sim = Simulator(SPLIT, [SimRequest("r0", 1.0, 100, 2)], EXACT)
    sim._push(-1.0, "retry")
    with pytest.raises(AssertionError, match="virtual time went back from 0.0 to -1.0"):
        sim.run()


def test_a_request_no_token_machine_can_hold_is_dropped_at_routing_and_the_others_run():
    requests = [SimRequest("fits", 1.0, 100, 5), SimRequest("too-long", 2.0, 9_000, 100)]
    result = by_id(simulate(SPLIT, requests, EXACT))
    assert result["fits"].ok
    assert not result["too-long"].ok
    assert result["too-long"].error.startswith("no worker: no token worker serving this model can hold 9100 tokens")
    assert (result["too-long"].ttft_s, result["too-long"].e2e_s, result["too-long"].tbt_s) == (None, None, [])


def test_a_request_whose_token_machine_stays_full_past_the_give_up_time_is_dropped():
    # "long" grows to 8990 tokens of KV by 1.4 + 88.9 s; "late" needs 8000 tokens free from t=20 on: never in 60 s.
    requests = [SimRequest("long", 1.0, 100, 8890), SimRequest("late", 20.0, 8000, 10)]
    result = by_id(simulate(SPLIT, requests, EXACT))
    assert result["long"].ok
    assert result["late"].error == "no KV memory on token-toy-machine-0 for 60s"


# -- the live policies -----------------------------------------------------------------------------------

def test_the_simulator_routes_and_pools_with_the_live_schedulers_functions():
    assert splitwise.sim.simulator.route is splitwise.cluster.routing.route
    assert splitwise.sim.simulator.plan is splitwise.cluster.pools.plan
    assert splitwise.sim.simulator.with_pools is splitwise.cluster.pools.with_pools


def test_each_simulated_machine_batches_with_the_engines_own_scheduler_and_blocks():
    machine = Simulator(SPLIT, [], EXACT).machines[0]
    assert type(machine.scheduler) is BatchScheduler
    assert type(machine.blocks) is BlockManager
    assert machine.scheduler.blocks is machine.blocks
    assert (machine.blocks.num_blocks, machine.blocks.block_size) == (8992 // 16, 16)


def test_the_default_config_is_what_the_live_services_start_with():
    scheduler, worker, engine = SchedulerConfig(), TokenWorkerConfig(), EngineConfig()
    config = SimConfig.live_defaults()
    assert config.routing_policy == scheduler.routing_policy
    assert config.conditional == ConditionalDisaggregation(scheduler.conditional_prefill_max_tokens,
                                                           scheduler.prompt_pool_busy_tokens)
    assert config.pool_policy == PoolPolicy(scheduler.pool_borrow_prompt_tokens, scheduler.pool_borrow_kv_fraction,
                                            scheduler.pool_cooldown_s)
    assert config.kv_layerwise_min_tokens == scheduler.kv_layerwise_min_tokens
    assert config.view_refresh_s == scheduler.registry_refresh_s
    assert config.heartbeat_s == worker.heartbeat_s
    assert config.limits.block_size == worker.block_size
    assert config.limits.max_batch_tokens == worker.max_batch_tokens
    assert config.limits.max_decode_batch == worker.max_decode_batch
    assert config.limits.decode_age_bound_s == engine.decode_age_bound_s
    assert Simulator(SPLIT, []).config == config


def one_at_a_time(count: int) -> list[SimRequest]:
    """Requests far enough apart that each finishes before the next arrives."""
    return [SimRequest(f"r{i}", 10.0 * i, 1000, 10) for i in range(count)]


def test_least_loaded_routing_sends_requests_that_never_overlap_to_the_same_machine():
    result = simulate(parse_design("baseline:4*dgx-a100"), one_at_a_time(8), SimConfig.live_defaults())
    assert [m.prompt_tokens for m in result.machines] == [8000, 0, 0, 0]


def test_the_view_shows_each_machine_as_of_its_last_heartbeat_as_the_live_registry_does():
    """A request that arrives after the first one's prefill has ended, but before its prompt machine's next
    heartbeat, sees that machine as busy (its last heartbeat said so) and goes to the other, as on the live cluster;
    with the state of the moment (no heartbeats modelled) it goes back to the first."""
    design = ClusterDesign("toy-2p", (Pool(TOY, "prompt", 2), Pool(TOY, "token", 1)))
    requests = [SimRequest("r1", 0.0, 100, 2), SimRequest("r2", 0.5, 100, 2)]  # r1's prompt phase ends at 0.4 s
    routed = {}
    for heartbeat_s in (1.0, 0.0):
        result = simulate(design, requests, EXACT.replace(view_refresh_s=0.25, heartbeat_s=heartbeat_s))
        assert all(r.ok for r in result.requests)
        routed[heartbeat_s] = [m.prompt_tokens for m in result.machines if m.role == "prompt"]
    assert routed == {1.0: [100, 100], 0.0: [200, 0]}


def test_round_robin_routing_spreads_requests_evenly_over_the_machines():
    config = SimConfig.live_defaults(routing_policy="round_robin")
    result = simulate(parse_design("baseline:4*dgx-a100"), one_at_a_time(8), config)
    assert [m.prompt_tokens for m in result.machines] == [2000, 2000, 2000, 2000]
    assert [m.decode_tokens for m in result.machines] == [18, 18, 18, 18]


def test_a_change_to_the_live_routing_policy_changes_the_simulation(monkeypatch):
    def last_worker(workers, request):
        last = max(workers, key=lambda w: w.worker_id)
        return Route(last, last)

    monkeypatch.setitem(splitwise.cluster.routing.POLICIES, "cls", last_worker)
    result = simulate(parse_design("baseline:4*dgx-a100"), one_at_a_time(8), SimConfig.live_defaults())
    assert [m.prompt_tokens for m in result.machines] == [0, 0, 0, 8000]


# -- hand-computed traces --------------------------------------------------------------------------------

def test_a_split_request_alone_takes_its_prefill_then_the_kv_transfer_then_decode_steps():
    result = by_id(simulate(SPLIT, [SimRequest("a", 1.0, 100, 5)], EXACT))["a"]
    first_gap = KV_100 + 0.005 + DECODE_1  # 100 < 512 tokens: the whole KV goes after the prefill
    assert result.ttft_s == pytest.approx(PREFILL_100, abs=1e-12)
    assert result.tbt_s == pytest.approx([first_gap, DECODE_1, DECODE_1, DECODE_1], abs=1e-12)
    assert result.e2e_s == pytest.approx(PREFILL_100 + first_gap + 3 * DECODE_1, abs=1e-12)


def test_a_long_enough_prompt_ships_its_kv_layer_by_layer_during_the_prefill():
    config = EXACT.replace(kv_layerwise_min_tokens=100)
    result = by_id(simulate(SPLIT, [SimRequest("a", 1.0, 100, 5)], config))["a"]
    # The link finishes at max(end + 0.2/10, start + 0.2) = end + 0.02.
    first_gap = KV_100 / 10 + 0.005 + DECODE_1
    assert result.ttft_s == pytest.approx(PREFILL_100, abs=1e-12)
    assert result.tbt_s == pytest.approx([first_gap, DECODE_1, DECODE_1, DECODE_1], abs=1e-12)


def test_a_second_split_request_joins_the_running_decode_batch_at_the_next_step_boundary():
    # a: prefill [1, 1.2], KV at 1.405, decodes alone at 1.415, 1.425, ...
    # b: prefill [1.253, 1.453], KV at 1.658: joins at a's step ending 1.665; then 4 steps of two at 0.011.
    requests = [SimRequest("a", 1.0, 100, 40), SimRequest("b", 1.253, 100, 5)]
    for decode_runs in (True, False):
        result = by_id(simulate(SPLIT, requests, EXACT.replace(decode_runs=decode_runs)))
        a, b = result["a"], result["b"]
        assert b.ttft_s == pytest.approx(PREFILL_100, abs=1e-9)
        assert b.tbt_s == pytest.approx([1.665 + DECODE_2 - 1.453] + [DECODE_2] * 3, abs=1e-9)
        assert b.e2e_s == pytest.approx(1.665 + 4 * DECODE_2 - 1.253, abs=1e-9)
        assert a.tbt_s == pytest.approx([0.215] + [DECODE_1] * 25 + [DECODE_2] * 4 + [DECODE_1] * 9, abs=1e-9)


def test_a_colocated_prefill_delays_the_running_decode_by_the_prefill():
    # a: prefill [1, 1.2], decodes alone from 1.2; b arrives at 1.253, prefills after a's step ending 1.26 until
    # 1.46; then both decode at 0.011 per step.
    requests = [SimRequest("a", 1.0, 100, 20), SimRequest("b", 1.253, 100, 5)]
    result = by_id(simulate(COLOCATED, requests, EXACT))
    a, b = result["a"], result["b"]
    assert b.ttft_s == pytest.approx(1.46 - 1.253, abs=1e-9)
    assert b.tbt_s == pytest.approx([DECODE_2] * 4, abs=1e-9)
    assert a.tbt_s == pytest.approx([DECODE_1] * 6 + [PREFILL_100 + DECODE_2] + [DECODE_2] * 3 + [DECODE_1] * 9,
                                    abs=1e-9)
    assert a.e2e_s == pytest.approx(0.2 + 0.06 + 0.211 + 0.033 + 0.09, abs=1e-9)


def test_a_decode_overdue_by_the_age_bound_runs_before_the_next_waiting_prefill():
    # As above, and c arrives during b's prefill: at 1.46 decode has waited 0.2 s >= decode_age_bound_s (0.05), so
    # one decode step of a and b runs first (to 1.471), then c's prefill (to 1.671), then a, b and c decode.
    requests = [SimRequest("a", 1.0, 100, 20), SimRequest("b", 1.253, 100, 5), SimRequest("c", 1.3, 100, 5)]
    result = by_id(simulate(COLOCATED, requests, EXACT))
    assert result["c"].ttft_s == pytest.approx(1.671 - 1.3, abs=1e-9)
    assert result["b"].tbt_s == pytest.approx([DECODE_2, PREFILL_100 + DECODE_3, DECODE_3, DECODE_3], abs=1e-9)
    assert result["c"].tbt_s == pytest.approx([DECODE_3] * 3 + [DECODE_2], abs=1e-9)


def test_machine_reports_count_busy_time_at_the_profiles_power_and_the_rest_as_idle():
    result = simulate(SPLIT, [SimRequest("a", 1.0, 100, 5)], EXACT)
    prompt, token = result.machines
    end = 1.0 + PREFILL_100 + KV_100 + 0.005 + 4 * DECODE_1
    assert result.sim_time_s == pytest.approx(end, abs=1e-12)
    assert (prompt.prefill_s, prompt.decode_s, prompt.prompt_tokens) == (pytest.approx(PREFILL_100), 0.0, 100)
    assert (token.prefill_s, token.decode_s, token.decode_tokens) == (0.0, pytest.approx(4 * DECODE_1), 4)
    idle = splitwise.sim.simulator.IDLE_POWER
    assert prompt.energy_kwh == pytest.approx((TOY_PERF.prompt_power * PREFILL_100 + idle * (end - PREFILL_100)) / 3600)
    assert token.energy_kwh == pytest.approx((TOY_PERF.token_power * 4 * DECODE_1 + idle * (end - 4 * DECODE_1)) / 3600)


def test_a_poisson_workload_is_reproducible_from_its_seed_and_draws_its_lengths_from_the_given_ones():
    lengths = [(100, 10), (2000, 50)]
    requests = poisson(5.0, 10.0, lengths, seed=7)
    assert requests == poisson(5.0, 10.0, lengths, seed=7) != poisson(5.0, 10.0, lengths, seed=8)
    assert all(0 < r.arrival_s < 10.0 for r in requests)
    assert [r.arrival_s for r in requests] == sorted(r.arrival_s for r in requests)
    assert {(r.prompt_tokens, r.output_tokens) for r in requests} == set(lengths)
    assert 25 < len(requests) < 80


# -- decode runs -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("design", ["baseline:2*dgx-a100", "splitwise:1*dgx-h100+1*dgx-a100"])
def test_decode_runs_computed_at_once_give_the_same_latencies_in_fewer_events(design, conv_lengths):
    requests = poisson(2.0, 20.0, conv_lengths, seed=3)
    stepped = simulate(parse_design(design), requests, SimConfig.live_defaults(decode_runs=False))
    runs = simulate(parse_design(design), requests, SimConfig.live_defaults(decode_runs=True))
    assert runs.events < stepped.events
    assert len(runs.requests) == len(stepped.requests) and runs.dropped == stepped.dropped == 0
    for fast, slow in zip(runs.requests, stepped.requests):
        assert fast.request_id == slow.request_id
        assert fast.ttft_s == pytest.approx(slow.ttft_s, abs=1e-9)
        assert fast.e2e_s == pytest.approx(slow.e2e_s, abs=1e-9)
        assert fast.tbt_s == pytest.approx(slow.tbt_s, abs=1e-9)
    assert [m.decode_tokens for m in runs.machines] == [m.decode_tokens for m in stepped.machines]


def test_a_request_arriving_exactly_at_a_step_boundary_is_scheduled_there_with_or_without_decode_runs():
    # Step times that floats hold exactly: a prefill of 0.25 s, decode steps of 1/128 s. a decodes alone from 1.25;
    # b arrives as a's fifth decode step ends, and the engine's next step is b's prefill (decode has just run).
    perf = PerfModel("toy", "toy-gpu", 1, prompt_points=((1, 0.25),), token_points=((1, 1 / 128),))
    design = ClusterDesign("dyadic", (Pool(MachineProfile(TOY_MACHINE, TOY_MODEL, perf), "mixed", 1),))
    requests = [SimRequest("a", 1.0, 100, 20), SimRequest("b", 1.25 + 5 / 128, 100, 5)]
    for decode_runs in (False, True):
        result = by_id(simulate(design, requests, EXACT.replace(decode_runs=decode_runs)))
        assert result["b"].ttft_s == 0.25, f"decode_runs={decode_runs}"
        assert result["a"].tbt_s[:6] == [1 / 128] * 5 + [0.25 + 1 / 128], f"decode_runs={decode_runs}"
