"""This scheduler's view of the cluster: the registered workers in their pools, and the routing decisions on it."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable

import redis.asyncio as redis

from splitwise.cluster.aio import keeps_cancellation
from splitwise.cluster.in_flight import InFlightLedger
from splitwise.cluster.pools import PoolPolicy, PoolStore, Transition, plan, with_pools
from splitwise.cluster.registry import WorkerInfo, WorkerRegistry
from splitwise.cluster.routing import POLICIES, ConditionalDisaggregation, Route, route, token_phase
from splitwise.telemetry import metrics
from splitwise.telemetry.tracing import tracer

log = logging.getLogger(__name__)

POOLS = ("prompt", "token", "mixed")
KEEP_TRANSITIONS_SHOWN = 20  # pool transitions ClusterStatus lists
# The view is stale once this many refresh intervals have passed without a successful read of the registry.
STALE_AFTER_INTERVALS = 20
LOG_FAILURES_EVERY_S = 30.0  # while reads fail, one line per this long


class ClusterView:
    def __init__(self, model: str, registry: WorkerRegistry, routing_policy: str = "cls",
                 conditional: ConditionalDisaggregation = ConditionalDisaggregation(),
                 pools: PoolStore | None = None, pool_policy: PoolPolicy = PoolPolicy()):
        if routing_policy not in POLICIES:
            raise ValueError(f"unknown routing policy {routing_policy!r}; choose from {', '.join(POLICIES)}")
        self.model = model
        self.registry = registry
        self.routing_policy = routing_policy
        self.conditional = conditional
        self.pools = pools
        self.pool_policy = pool_policy
        self.routed = 0  # requests routed so far: round-robin's turn, random's seed
        self.declared: list[WorkerInfo] = []  # as registered, with the role each declared
        self.membership: dict[str, str] = {}  # borrowed workers -> their pool now
        self.transitions: list[Transition] = []
        self.workers: list[WorkerInfo] = []  # as routing sees them: each in its current pool
        self.in_flight = InFlightLedger()  # what this scheduler sent each worker since its last heartbeat
        self.refreshed_at = time.monotonic()  # the last successful refresh
        self.stale = False

    @keeps_cancellation
    async def refresh(self) -> None:
        """Reads the registry and the pools, and moves a worker between pools if the load calls for it."""
        declared = await self.registry.workers()
        self.in_flight.reported(declared)
        membership = await self.pools.membership() if self.pools else {}
        if self.pools and self.pool_policy.enabled:
            transitions = await self.pools.transitions(KEEP_TRANSITIONS_SHOWN)
            self.transitions = transitions
            last_change = transitions[0].at if transitions else 0.0
            change = plan(declared, membership, self.pool_policy, self.in_flight_tokens, time.time(), last_change)
            if change is not None and await self.pools.apply(change, self.pool_policy.cooldown_s):
                self._record_transition(change)
                membership = await self.pools.membership()
                self.transitions = [change, *transitions][:KEEP_TRANSITIONS_SHOWN]
            gone = list(set(membership) - {w.worker_id for w in declared})
            if gone:
                await self.pools.forget(gone)
        self.declared, self.membership = declared, membership
        self.workers = with_pools(declared, membership)
        self.refreshed_at = time.monotonic()

    @property
    def refresh_age_s(self) -> float:
        return time.monotonic() - self.refreshed_at

    async def refresh_forever(self, interval_s: float,
                              on_stale: Callable[[bool], Awaitable[None]] | None = None) -> None:
        """Refreshes every interval whatever a refresh raises, so that the view never freezes for good. When no
        refresh has succeeded for STALE_AFTER_INTERVALS intervals the view is stale: on_stale(True) is awaited, and
        on_stale(False) once a refresh succeeds again."""
        failures_logged_at = float("-inf")
        while True:
            try:
                await self.refresh()
            except Exception as e:
                if time.monotonic() - failures_logged_at >= LOG_FAILURES_EVERY_S:
                    failures_logged_at = time.monotonic()
                    log.warning("cannot refresh the view of the cluster (last success %.1fs ago): %r",
                                self.refresh_age_s, e, exc_info=not isinstance(e, (redis.RedisError, OSError)))
            stale = self.refresh_age_s > STALE_AFTER_INTERVALS * interval_s
            if stale != self.stale:
                self.stale = stale
                if stale:
                    log.error("the view of the cluster is stale: no refresh has succeeded for %.1fs",
                              self.refresh_age_s)
                else:
                    log.info("the view of the cluster is fresh again")
                    failures_logged_at = float("-inf")
                if on_stale:
                    try:
                        await on_stale(stale)
                    except Exception:
                        log.exception("cannot report the view's staleness")
            await asyncio.sleep(interval_s)

    def _record_transition(self, change: Transition) -> None:
        with tracer().start_as_current_span("scheduler.pool_transition") as span:
            span.set_attributes({"pool.worker": change.worker_id, "pool.from": change.from_pool,
                                 "pool.to": change.to_pool, "pool.reason": change.reason})
        metrics.pool_transitions.add(1, {"from": change.from_pool, "to": change.to_pool})
        log.info("pools: %s moves from the %s pool to the %s pool (%s)", change.worker_id, change.from_pool,
                 change.to_pool, change.reason)

    def route(self, prompt_tokens: int, max_tokens: int, avoided: set[str]) -> Route:
        """A prompt and a token worker for a request, by the routing policy; recorded as a span."""
        with tracer().start_as_current_span("scheduler.route") as span:
            candidates = [w for w in self.workers if w.worker_id not in avoided]
            span.set_attributes({f"route.pool.{pool}.workers": sum(w.role == pool for w in candidates) for pool in POOLS})
            self.routed += 1
            chosen = route(candidates, self.model, prompt_tokens + max_tokens, self.in_flight_tokens,
                           self.routing_policy, prompt_tokens, self.routed, self.conditional)
            span.set_attributes({**self._described("prompt_worker", chosen.prompt_worker),
                                 **self._described("token_worker", chosen.token_worker),
                                 "route.policy": self.routing_policy, "route.colocated": chosen.colocated,
                                 "route.avoided_workers": len(avoided)})
            return chosen

    def route_resume(self, prompt_tokens: int, max_tokens: int, output_tokens: int, kv: str,
                     avoided: set[str]) -> WorkerInfo:
        """A token worker to go on with a request that has streamed `output_tokens` already; recorded as a span."""
        with tracer().start_as_current_span("scheduler.route") as span:
            candidates = [w for w in self.workers if w.worker_id not in avoided]
            self.routed += 1
            token_w = token_phase(candidates, self.model, prompt_tokens + max_tokens, self.in_flight_tokens,
                                  self.routing_policy, self.routed)
            span.set_attributes({"route.resume": True, "route.resume.output_tokens": output_tokens,
                                 "route.resume.kv": kv, **self._described("token_worker", token_w),
                                 "route.policy": self.routing_policy, "route.avoided_workers": len(avoided)})
            return token_w

    def _described(self, name: str, worker: WorkerInfo) -> dict:
        return {f"route.{name}": worker.worker_id, f"route.{name}.pool": worker.role,
                f"route.{name}.pending_tokens": worker.pending_tokens,
                f"route.{name}.in_flight_tokens": self.in_flight_tokens.get(worker.worker_id, 0)}

    @property
    def in_flight_tokens(self) -> dict[str, int]:
        """Tokens this scheduler sent each worker that the worker's last heartbeat read does not report yet."""
        return self.in_flight.tokens

    def loaded(self, tokens_by_worker: dict[str, int]):
        """Counts tokens sent to workers in their load (routing adds them) until a heartbeat written after now
        reports them, or the block ends: never twice."""
        return self.in_flight.sent(tokens_by_worker, time.time())

    def gauges(self):
        """Pool sizes and queued tokens as this scheduler sees the registry, and how old that view is, for the
        metrics endpoint."""
        yield "splitwise.registry.refresh_age", self.refresh_age_s, {}
        for pool in POOLS:
            members = [w for w in self.workers if w.role == pool]
            yield "splitwise.pool.workers", len(members), {"splitwise.pool": pool}
            yield "splitwise.pool.pending_tokens", sum(w.pending_tokens for w in members), {"splitwise.pool": pool}
