"""The discrete-event cluster simulator: the live scheduler's routing and pool code and the engine's batching code,
run in virtual time over a cluster design and a workload.

At each arrival the scheduler's view of the workers (their heartbeats: pending tokens, KV in use, their pools) goes
to `pools.plan` and `routing.route`, imported from the live scheduler. A colocated request runs whole on its
machine. A split one reserves KV blocks on its token machine, is prefilled on its prompt machine (the first token
reaches the client there), ships its KV (layer by layer when long enough), and decodes on the token machine. Each
machine steps its own BatchScheduler; a step takes the performance model's time.
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from dataclasses import dataclass, field

from splitwise.slo import IdleBaseline, RequestResult, SLOReport, slo_attainment, summarize
from splitwise.cluster.in_flight import InFlightLedger
from splitwise.cluster.pools import PoolPolicy, plan, with_pools
from splitwise.cluster.registry import WorkerInfo
from splitwise.cluster.routing import ConditionalDisaggregation, NoWorkerAvailable, route
from splitwise.config import SchedulerConfig, TokenWorkerConfig
from splitwise.engine.sequence import FinishReason, Sequence
from splitwise.sim.designs import ClusterDesign
from splitwise.sim.kv_model import DEFAULT_PER_TRANSFER_S, KVLink
from splitwise.sim.machine import EngineLimits, SimMachine, steps_begun
from splitwise.sim.machines import MachineProfile
from splitwise.sim.workload import SimRequest

IDLE_POWER = 0.25  # fraction of rated power a machine draws with nothing to compute (an assumption, not measured)
RESERVE_RETRY_S = 0.01  # a request whose token machine has no free blocks asks again this often ...
RESERVE_GIVE_UP_S = 60.0  # ... for this long, and is dropped after
GOLDEN_FRACTION = 0.6180339887  # machine i beats at (i x this) mod 1 of the interval: phases spread evenly, no two alike


@dataclass(frozen=True)
class SimConfig:
    """The scheduler's policies and the workers' engine limits, by default those the live services start with."""

    routing_policy: str = "cls"
    conditional: ConditionalDisaggregation = ConditionalDisaggregation()
    pool_policy: PoolPolicy = PoolPolicy()
    kv_layerwise_min_tokens: int = 512
    per_transfer_s: float = DEFAULT_PER_TRANSFER_S
    # How often the scheduler's view of the workers (their heartbeats) is refreshed; meanwhile it adds the tokens it
    # routed to each worker whose prompt phase has not ended, as the live scheduler does. 0: an exact view.
    view_refresh_s: float = 0.25
    # How often each worker writes its heartbeat (each at its own phase): a refreshed view shows each worker as of its
    # last one, up to this old, as the live registry does. 0: a refresh reads every worker's state of the moment.
    heartbeat_s: float = 1.0
    limits: EngineLimits = EngineLimits()
    decode_runs: bool = True  # runs of identical decode steps computed at once; False: every step (same result)
    # What the live path costs beside the engine's steps, for predicting a live cluster (calibrated on it idle):
    request_overhead_s: float = 0.0  # from the client's send to the request's arrival at its worker's engine
    step_overhead_s: float = 0.0  # each engine step's bookkeeping and token delivery beyond the model's compute

    @classmethod
    def live_defaults(cls, **changes) -> SimConfig:
        scheduler, worker = SchedulerConfig(), TokenWorkerConfig()
        config = cls(
            routing_policy=scheduler.routing_policy,
            conditional=ConditionalDisaggregation(scheduler.conditional_prefill_max_tokens,
                                                  scheduler.prompt_pool_busy_tokens),
            pool_policy=PoolPolicy(scheduler.pool_borrow_prompt_tokens, scheduler.pool_borrow_kv_fraction,
                                   scheduler.pool_cooldown_s),
            kv_layerwise_min_tokens=scheduler.kv_layerwise_min_tokens,
            view_refresh_s=scheduler.registry_refresh_s,
            heartbeat_s=worker.heartbeat_s,
            limits=EngineLimits(block_size=worker.block_size, max_batch_tokens=worker.max_batch_tokens,
                                max_decode_batch=worker.max_decode_batch, mixed_batches=worker.mixed_batches),
        )
        return config.replace(**changes) if changes else config

    def replace(self, **changes) -> SimConfig:
        from dataclasses import replace
        return replace(self, **changes)


@dataclass(eq=False)
class _Request:
    request: SimRequest
    token_seq: Sequence | None = None
    prompt_seq: Sequence | None = None
    prompt_machine: SimMachine | None = None
    token_machine: SimMachine | None = None
    first_token_s: float | None = None
    last_token_s: float = 0.0
    gaps: list[float] = field(default_factory=list)
    done_s: float | None = None
    prefill_start_s: float | None = None
    waiting_since_s: float = 0.0
    dropped: str = ""
    send: int | None = None  # its tokens in the scheduler's in-flight ledger


@dataclass
class MachineReport:
    worker_id: str
    machine: str
    role: str
    prefill_s: float
    decode_s: float
    prompt_tokens: int
    decode_tokens: int
    energy_kwh: float
    steps: int = 0


@dataclass
class SimResult:
    design: ClusterDesign
    requests: list[RequestResult]
    sim_time_s: float
    events: int
    wall_s: float
    machines: list[MachineReport]
    pool_transitions: int

    @property
    def dropped(self) -> int:
        return sum(not r.ok for r in self.requests)

    @property
    def events_per_s(self) -> float:
        return self.events / max(self.wall_s, 1e-9)

    @property
    def engine_steps(self) -> int:
        """Engine steps simulated (a run of decode steps computed at once counts each of its steps)."""
        return sum(m.steps for m in self.machines)

    @property
    def average_power_kw(self) -> float:
        return sum(m.energy_kwh for m in self.machines) / max(self.sim_time_s / 3600, 1e-12)

    def summary(self) -> dict:
        return summarize(self.requests)

    def slo(self, baseline: IdleBaseline, tbt: str = "gaps") -> SLOReport:
        """The nine SLOs; tbt="request_mean" samples TBT per request as the paper's simulator does."""
        return slo_attainment(self.requests, baseline, tbt=tbt)


def idle_baseline(profile: MachineProfile) -> IdleBaseline:
    """A request alone on a machine of this profile: its prefill, then one-sequence decode steps (at its context,
    where the profile is read by context: see `PerfModel.decode_alone_s`)."""
    perf = profile.perf
    ttft = tuple((int(x), perf.prefill_s(x)) for x, _ in perf.prompt_points)
    if perf.decode_curve == "batch_size":
        return IdleBaseline(ttft_points=ttft, tbt_points=((1, perf.decode_s(1)),))
    return IdleBaseline(ttft_points=ttft, tbt_points=tuple((x, perf.decode_alone_s(x)) for x, _ in ttft))


class Simulator:
    def __init__(self, design: ClusterDesign, requests: list[SimRequest], config: SimConfig | None = None):
        self.design = design
        self.config = config or SimConfig.live_defaults()
        self.requests = sorted(requests, key=lambda r: r.arrival_s)
        self.now = 0.0
        self._events: list = []
        self._counter = itertools.count()
        self.events = 0
        self.machines: list[SimMachine] = []
        for pool in design.pools:
            for i in range(pool.count):
                worker_id = f"{pool.role}-{pool.profile.machine.name}-{i}"
                self.machines.append(SimMachine(worker_id, pool.role, pool.profile, self.config.limits, self._clock,
                                                decode_runs=self.config.decode_runs,
                                                step_overhead_s=self.config.step_overhead_s))
        self.by_id = {m.worker_id: m for m in self.machines}
        self.membership: dict[str, str] = {}
        self.last_pool_change = -math.inf
        self.pool_transitions = 0
        self._owner: dict[Sequence, _Request] = {}
        self._backlog: list[_Request] = []
        self._view: list | None = None
        self._view_at = -math.inf
        self._beats: dict[str, WorkerInfo] = {}  # each machine's last heartbeat, when heartbeats are modelled
        self._work = 0  # events in the queue besides heartbeats: the run ends when none is left and none arrives
        self._in_flight = InFlightLedger()
        self._routed = 0

    def _clock(self) -> float:
        return self.now

    def _push(self, at: float, kind: str, *payload) -> None:
        heapq.heappush(self._events, (at, next(self._counter), kind, payload))
        self._work += kind != "beat"

    # -- the loop -------------------------------------------------------------------------------------------

    def run(self) -> SimResult:
        started = time.perf_counter()
        states = [_Request(r) for r in self.requests]
        arrivals = iter(states)
        upcoming = next(arrivals, None)
        delay = self.config.request_overhead_s
        upcoming_at = upcoming.request.arrival_s + delay if upcoming else 0.0
        handlers = {"step": self._step_done, "kv": self._kv_arrived, "retry": self._retry_backlog, "beat": self._beat}
        self._start_heartbeats()
        while self._work or upcoming is not None:
            if upcoming is not None and (not self._events or upcoming_at <= self._events[0][0]):
                at, kind, payload = upcoming_at, "arrival", (upcoming,)
                upcoming = next(arrivals, None)
                upcoming_at = upcoming.request.arrival_s + delay if upcoming else 0.0
            else:
                at, _, kind, payload = heapq.heappop(self._events)
                self._work -= kind != "beat"
            if at < self.now:
                raise AssertionError(f"virtual time went back from {self.now} to {at} ({kind})")
            self.now = at
            self.events += 1
            if kind == "arrival":
                self._arrive(*payload)
            else:
                handlers[kind](*payload)
        wall = time.perf_counter() - started
        return SimResult(self.design, [self._result(s) for s in states], self.now, self.events, wall,
                         [self._machine_report(m) for m in self.machines], self.pool_transitions)

    # -- the scheduler ----------------------------------------------------------------------------------------

    def _start_heartbeats(self) -> None:
        """Each machine registers at the start (its first heartbeat) and then beats every heartbeat_s, the machines'
        beats spread over the interval as workers started at different moments are."""
        if self.config.view_refresh_s <= 0 or self.config.heartbeat_s <= 0:
            return
        for i, machine in enumerate(self.machines):
            self._beats[machine.worker_id] = machine.info(self.now)
            phase = (i * GOLDEN_FRACTION) % 1.0 * self.config.heartbeat_s
            self._push(self.now + phase, "beat", machine)

    def _beat(self, machine: SimMachine) -> None:
        self._beats[machine.worker_id] = machine.info(self.now)
        self._push(self.now + self.config.heartbeat_s, "beat", machine)

    def _workers(self):
        """The scheduler's view: exact, or the workers' heartbeats as last refreshed plus the tokens routed to them
        since that their heartbeats do not report."""
        refresh = self.config.view_refresh_s
        if refresh <= 0:
            return [m.info(self.now) for m in self.machines], {}
        if self.now - self._view_at >= refresh:
            if self._beats:
                view = [self._beats[m.worker_id] for m in self.machines]
            else:
                view = [m.info(self.now) for m in self.machines]
            self._view, self._view_at = view, self.now
            self._in_flight.reported(self._view)
        return self._view, self._in_flight.tokens

    def _sent(self, state: _Request) -> None:
        """Counts a request's tokens in flight on its workers until the next view reports them or it ends, as the
        live scheduler does (`ClusterView.loaded`)."""
        if self.config.view_refresh_s <= 0:
            return
        r = state.request
        state.send = self._in_flight.add({state.prompt_machine.worker_id: r.prompt_tokens,
                                          state.token_machine.worker_id: r.prompt_tokens + r.output_tokens}, self.now)

    def _ended(self, state: _Request) -> None:
        if state.send is not None:
            self._in_flight.end(state.send)
            state.send = None

    def _arrive(self, state: _Request) -> None:
        request = state.request
        declared, in_flight = self._workers()
        policy = self.config.pool_policy
        if policy.enabled:
            change = plan(declared, self.membership, policy, in_flight, self.now, self.last_pool_change)
            if change is not None:
                if change.from_pool == "mixed":
                    self.membership.pop(change.worker_id, None)
                else:
                    self.membership[change.worker_id] = change.to_pool
                self.last_pool_change = self.now
                self.pool_transitions += 1
        workers = with_pools(declared, self.membership) if self.membership else declared
        needed = request.prompt_tokens + request.output_tokens
        self._routed += 1
        try:
            chosen = route(workers, workers[0].model if workers else "sim", needed, in_flight,
                           self.config.routing_policy, request.prompt_tokens, self._routed, self.config.conditional)
        except NoWorkerAvailable as e:
            state.dropped = f"no worker: {e}"
            return
        token_machine = self.by_id[chosen.token_worker.worker_id]
        state.token_machine = token_machine
        state.token_seq = SimMachine.sequence(request.request_id, request.prompt_tokens, request.output_tokens)
        self._owner[state.token_seq] = state
        if chosen.colocated:
            state.prompt_machine = token_machine
            self._sent(state)
            token_machine.submit(state.token_seq)
            self._touch(token_machine)
            self._kick(token_machine)
            return
        state.prompt_machine = self.by_id[chosen.prompt_worker.worker_id]
        self._sent(state)
        state.waiting_since_s = self.now
        self._admit_split(state)

    def _admit_split(self, state: _Request) -> None:
        self._touch(state.token_machine)
        if not state.token_machine.reserve(state.token_seq):
            if not self._backlog:
                self._push(self.now + RESERVE_RETRY_S, "retry")
            self._backlog.append(state)
            return
        request = state.request
        state.prompt_seq = SimMachine.sequence(request.request_id, request.prompt_tokens, request.output_tokens,
                                               prefill_only=True)
        self._owner[state.prompt_seq] = state
        state.prompt_machine.submit(state.prompt_seq)
        self._touch(state.prompt_machine)
        self._kick(state.prompt_machine)

    def _retry_backlog(self) -> None:
        waiting, self._backlog = self._backlog, []
        for state in waiting:
            if self.now - state.waiting_since_s > RESERVE_GIVE_UP_S:
                state.dropped = f"no KV memory on {state.token_machine.worker_id} for {RESERVE_GIVE_UP_S:.0f}s"
                del self._owner[state.token_seq]
                self._ended(state)
                continue
            self._admit_split(state)

    # -- machines ---------------------------------------------------------------------------------------------

    def _kick(self, machine: SimMachine) -> None:
        if machine.busy:
            return
        step = machine.next_step()
        if step is None:
            return
        batch, seconds, steps = step
        if batch.prefill:
            for seq in batch.seqs:
                state = self._owner[seq]
                if state.prefill_start_s is None:
                    state.prefill_start_s = self.now
        machine.run = run = [batch, seconds, steps, self.now]
        self._push(self.now + seconds * steps, "step", machine, run)

    def _touch(self, machine: SimMachine) -> None:
        """The machine gets new work: a run of decode steps in progress ends at its next step boundary, where the
        engine would schedule again."""
        run = machine.run
        if run is None or run[2] == 1:
            return
        batch, seconds, steps, start = run
        done = steps_begun(self.now, start, seconds)  # at a boundary exactly, the next step has not begun
        if done < steps:
            for seq in batch.seqs:  # the blocks of the steps up to the boundary, before anything else takes them
                machine.blocks.grow(seq.block_table, seq.num_tokens + done - 1)
            machine.run = cut = [batch, seconds, done, start]
            self._push(max(start + seconds * done, self.now), "step", machine, cut)  # the longer run's event is stale

    def _step_done(self, machine: SimMachine, run: list) -> None:
        if machine.run is not run:
            return  # a run that was cut short
        machine.run = None
        batch, seconds, steps, start = run
        first_end = start + seconds
        for seq, reason in machine.finish_step(batch, seconds, steps):
            state = self._owner[seq]
            if state.first_token_s is None:
                state.first_token_s = first_end
            else:
                state.gaps.append(first_end - state.last_token_s)
            if steps > 1:
                state.gaps.extend([seconds] * (steps - 1))
            state.last_token_s = self.now
            if reason is FinishReason.PREFILLED:
                self._ship_kv(state)
            elif reason is not None:
                self._done(state)
        self._kick(machine)

    def _ship_kv(self, state: _Request) -> None:
        prompt_m, token_m = state.prompt_machine, state.token_machine
        link = KVLink(min(prompt_m.profile.machine.link_bytes_per_s, token_m.profile.machine.link_bytes_per_s),
                      self.config.per_transfer_s)
        tokens = state.request.prompt_tokens
        spec = prompt_m.profile.model
        at = link.arrival_s(tokens * spec.kv_bytes_per_token, spec.num_layers, state.prefill_start_s, self.now,
                            layerwise=tokens >= self.config.kv_layerwise_min_tokens)
        self._push(at, "kv", state)

    def _kv_arrived(self, state: _Request) -> None:
        prompt_m, token_m = state.prompt_machine, state.token_machine
        prompt_m.free_blocks_of(state.prompt_seq)
        del self._owner[state.prompt_seq]
        self._touch(prompt_m)
        self._kick(prompt_m)
        if token_m.start_decoding(state.token_seq) is not None:
            self._done(state)  # its first token was its last
        self._touch(token_m)
        self._kick(token_m)

    def _done(self, state: _Request) -> None:
        state.done_s = self.now
        self._ended(state)
        self._owner.pop(state.token_seq, None)

    # -- results ----------------------------------------------------------------------------------------------

    def _result(self, state: _Request) -> RequestResult:
        r = state.request
        if state.done_s is None:
            error = state.dropped or "not finished when the simulation ended"
            return RequestResult(r.request_id, r.arrival_s, r.prompt_tokens, 0, None, [], None, error)
        return RequestResult(r.request_id, r.arrival_s, r.prompt_tokens, r.output_tokens,
                             state.first_token_s - r.arrival_s, state.gaps, state.done_s - r.arrival_s)

    def _machine_report(self, m: SimMachine) -> MachineReport:
        perf, rated = m.profile.perf, m.profile.machine.power_kw
        idle = max(self.now - m.stats.prefill_s - m.stats.decode_s, 0.0)
        kwh = rated * (perf.prompt_power * m.stats.prefill_s + perf.token_power * m.stats.decode_s
                       + IDLE_POWER * idle) / 3600
        return MachineReport(m.worker_id, m.profile.machine.name, m.role, m.stats.prefill_s, m.stats.decode_s,
                             m.stats.prompt_tokens, m.stats.decode_tokens, kwh, m.stats.steps)


def simulate(design: ClusterDesign, requests: list[SimRequest], config: SimConfig | None = None) -> SimResult:
    return Simulator(design, requests, config).run()
