"""Pools: prompt, token and mixed. Workers declare a role (their home pool); when one pool is overloaded the
scheduler borrows a worker of the other into the mixed pool, where it serves both phases, and returns it once
the overload has drained (the paper's design).

`plan` is a pure function of the observed state, like the routing policies. `PoolStore` keeps the membership
and the recent transitions in Redis, so that every scheduler replica routes by the same pools.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, replace
from typing import Mapping, Sequence

import redis.asyncio as redis

from splitwise.cluster.registry import WorkerInfo
from splitwise.cluster.routing import kv_in_use, load

log = logging.getLogger(__name__)

MEMBERSHIP_KEY = "splitwise:pools"  # hash: worker id -> the pool it was moved to (absent: its home pool)
TRANSITIONS_KEY = "splitwise:pools:transitions"  # list of JSON transitions, newest first
LOCK_KEY = "splitwise:pools:lock"  # one scheduler replica changes the pools at a time
KEEP_TRANSITIONS = 100


@dataclass(frozen=True)
class PoolPolicy:
    """When to borrow and when to give back. Off when prompt_borrow_tokens is 0.

    The prompt pool is overloaded when every prompt-pool worker has prompt_borrow_tokens pending; the token
    pool when every token-pool worker has token_borrow_kv_fraction of its KV memory in use. A borrowed worker
    goes home when the pool that borrowed it is below half of that, and no change follows another within
    cooldown_s. A pool may lend its last worker: in the mixed pool it still serves its home phase, and the
    other phase besides.
    """

    prompt_borrow_tokens: int = 0
    token_borrow_kv_fraction: float = 0.9
    cooldown_s: float = 2.0

    @property
    def enabled(self) -> bool:
        return self.prompt_borrow_tokens > 0


@dataclass(frozen=True)
class Transition:
    worker_id: str
    from_pool: str
    to_pool: str
    reason: str
    at: float = 0.0  # unix seconds


def pool_of(worker: WorkerInfo, membership: Mapping[str, str]) -> str:
    return membership.get(worker.worker_id, worker.role)


def with_pools(workers: Sequence[WorkerInfo], membership: Mapping[str, str]) -> list[WorkerInfo]:
    """The workers as routing sees them: each in its current pool (a borrowed worker is "mixed")."""
    return [replace(w, role=pool_of(w, membership)) for w in workers]


def plan(workers: Sequence[WorkerInfo], membership: Mapping[str, str], policy: PoolPolicy,
         in_flight_tokens: Mapping[str, int], now: float, last_change: float) -> Transition | None:
    """The one change of pools the observed state calls for, if any.

    `workers` carry their declared role; `membership` maps a borrowed worker to its current pool.
    """
    if not policy.enabled or now - last_change < policy.cooldown_s:
        return None
    prompt_pool = [w for w in workers if pool_of(w, membership) == "prompt"]
    token_pool = [w for w in workers if pool_of(w, membership) == "token"]
    borrowed = sorted((w for w in workers if w.worker_id in membership and w.role != "mixed"),
                      key=lambda w: w.worker_id)
    prompt_load = min((load(w, in_flight_tokens) for w in prompt_pool), default=0)
    token_kv = min((kv_in_use(w, in_flight_tokens) for w in token_pool), default=0.0)
    prompt_busy = bool(prompt_pool) and prompt_load >= policy.prompt_borrow_tokens
    token_busy = bool(token_pool) and token_kv >= policy.token_borrow_kv_fraction

    # Give back first: a borrowed worker goes home once the pool that borrowed it has drained.
    for w in borrowed:
        if w.role == "token" and prompt_load < policy.prompt_borrow_tokens / 2 and not token_busy:
            return Transition(w.worker_id, "mixed", "token",
                              f"prompt pool drained: {prompt_load} pending tokens per worker at least", now)
        if w.role == "prompt" and token_kv < policy.token_borrow_kv_fraction / 2 and not prompt_busy:
            return Transition(w.worker_id, "mixed", "prompt",
                              f"token pool drained: {token_kv:.0%} of KV memory in use at least", now)
    if prompt_busy and not token_busy and token_pool:
        lender = min(token_pool, key=lambda w: (kv_in_use(w, in_flight_tokens), w.worker_id))
        return Transition(lender.worker_id, "token", "mixed",
                          f"prompt pool busy: every worker has {prompt_load}+ pending tokens", now)
    if token_busy and not prompt_busy and prompt_pool:
        lender = min(prompt_pool, key=lambda w: (load(w, in_flight_tokens), w.worker_id))
        return Transition(lender.worker_id, "prompt", "mixed",
                          f"token pool busy: every worker has {token_kv:.0%}+ of its KV memory in use", now)
    return None


class PoolStore:
    """Pool membership and transitions in Redis, shared by the scheduler replicas."""

    def __init__(self, client: redis.Redis, owner: str):
        self.client = client
        self.owner = owner

    async def membership(self) -> dict[str, str]:
        raw = await self.client.hgetall(MEMBERSHIP_KEY)
        return {_text(k): _text(v) for k, v in raw.items()}

    async def transitions(self, count: int = 20) -> list[Transition]:
        """The recent transitions, newest first; an entry that is not one (a stray write) is skipped and logged."""
        found = []
        for raw in await self.client.lrange(TRANSITIONS_KEY, 0, count - 1):
            transition = parse_transition(raw)
            if transition is None:
                log.warning("skipped a pool transition that is not one: %.120r", raw)
            else:
                found.append(transition)
        return found

    async def apply(self, transition: Transition, lock_s: float) -> bool:
        """Records the transition unless another replica holds the lock (it changes the pools now)."""
        if not await self.client.set(LOCK_KEY, self.owner, nx=True, px=max(int(lock_s * 1000), 1)):
            return False
        async with self.client.pipeline(transaction=True) as pipe:
            if transition.from_pool == "mixed":  # only a borrowed worker leaves the mixed pool: it goes home
                pipe.hdel(MEMBERSHIP_KEY, transition.worker_id)
            else:
                pipe.hset(MEMBERSHIP_KEY, transition.worker_id, transition.to_pool)
            pipe.lpush(TRANSITIONS_KEY, json.dumps(asdict(transition)))
            pipe.ltrim(TRANSITIONS_KEY, 0, KEEP_TRANSITIONS - 1)
            await pipe.execute()
        return True

    async def forget(self, worker_ids: list[str]) -> None:
        """Drops the membership of workers that left the registry (a worker that comes back starts at home)."""
        await self.client.hdel(MEMBERSHIP_KEY, *worker_ids)


def parse_transition(raw) -> Transition | None:
    try:
        fields = json.loads(raw)
        transition = Transition(**fields)
    except (TypeError, ValueError):
        return None
    strings = (transition.worker_id, transition.from_pool, transition.to_pool, transition.reason)
    if not all(isinstance(s, str) for s in strings) or isinstance(transition.at, bool) \
            or not isinstance(transition.at, (int, float)):
        return None
    return transition


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else value
