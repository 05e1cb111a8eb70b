"""Routing policies: pure functions from the observed cluster state to a choice of workers.

No I/O and no hidden state: everything a policy looks at is in its arguments (the registry's view of the
workers, what this scheduler has sent since their last heartbeat, the request's number for round-robin and
random), so the live scheduler and a simulator run the same code.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

from splitwise.cluster.registry import WorkerInfo


class NoWorkerAvailable(Exception):
    pass


@dataclass(frozen=True)
class Route:
    prompt_worker: WorkerInfo
    token_worker: WorkerInfo

    @property
    def colocated(self) -> bool:
        """Both phases on one worker: a mixed worker, or a token worker prefilling a short prompt itself."""
        return self.prompt_worker.worker_id == self.token_worker.worker_id


@dataclass(frozen=True)
class RoutingRequest:
    """What a policy knows of the request and of this scheduler's recent decisions."""

    model: str
    prompt_tokens: int
    needed_kv_tokens: int  # prompt + max_tokens: what the token worker must be able to hold
    in_flight_tokens: Mapping[str, int]  # tokens this scheduler sent each worker since its last heartbeat
    sequence: int = 0  # this scheduler's request counter: round-robin's turn, random's seed


def load(worker: WorkerInfo, in_flight_tokens: Mapping[str, int]) -> int:
    """Pending tokens as the worker last reported them plus what this scheduler sent it since."""
    return worker.pending_tokens + in_flight_tokens.get(worker.worker_id, 0)


def prompt_work(worker: WorkerInfo, in_flight_tokens: Mapping[str, int]) -> int:
    """Work ahead of a new prompt on the worker: its queued prompt tokens not yet prefilled, one token for each
    request it holds (each adds a token to every step it shares), and what this scheduler sent it since its
    heartbeat. KV held is not work: a worker decoding long contexts has no prompt queue for being full (this is
    the paper's simulator's JSQ measure, its instances' pending tokens)."""
    queued = max(worker.pending_tokens - worker.kv_used_tokens, 0)
    return queued + worker.active_requests + in_flight_tokens.get(worker.worker_id, 0)


def kv_in_use(worker: WorkerInfo, in_flight_tokens: Mapping[str, int]) -> float:
    """Fraction of the worker's KV memory in use, counting what this scheduler sent it since."""
    used = worker.kv_used_tokens + in_flight_tokens.get(worker.worker_id, 0)
    return used / max(worker.kv_capacity_tokens, 1)


def join_shortest_queue(workers: Sequence[WorkerInfo], in_flight_tokens: Mapping[str, int]) -> WorkerInfo:
    if not workers:
        raise NoWorkerAvailable("no worker of this role is registered")
    return min(workers, key=lambda w: (load(w, in_flight_tokens), w.worker_id))


def least_prompt_work(workers: Sequence[WorkerInfo], in_flight_tokens: Mapping[str, int]) -> WorkerInfo:
    if not workers:
        raise NoWorkerAvailable("no worker of this role is registered")
    return min(workers, key=lambda w: (prompt_work(w, in_flight_tokens), load(w, in_flight_tokens), w.worker_id))


def least_kv_in_use(workers: Sequence[WorkerInfo], in_flight_tokens: Mapping[str, int]) -> WorkerInfo:
    if not workers:
        raise NoWorkerAvailable("no worker of this role is registered")
    return min(workers, key=lambda w: (kv_in_use(w, in_flight_tokens), load(w, in_flight_tokens), w.worker_id))


def candidates(workers: Sequence[WorkerInfo], request: RoutingRequest) -> tuple[list[WorkerInfo], list[WorkerInfo]]:
    """Prompt-phase and token-phase candidates: workers serving the model (the KV handshake between the pair
    checks the weights themselves); for the token phase, only workers whose KV capacity can ever hold it."""
    same_model = [w for w in workers if w.model == request.model]
    prompt = [w for w in same_model if w.role in ("prompt", "mixed")]
    token = [w for w in same_model if w.role in ("token", "mixed") and w.kv_capacity_tokens >= request.needed_kv_tokens]
    if not prompt:
        raise NoWorkerAvailable("no prompt worker serving this model is registered")
    if not token:
        raise NoWorkerAvailable(f"no token worker serving this model can hold {request.needed_kv_tokens} tokens of KV")
    return sorted(prompt, key=lambda w: w.worker_id), sorted(token, key=lambda w: w.worker_id)


def jsq(workers: Sequence[WorkerInfo], request: RoutingRequest) -> Route:
    """Join-the-shortest-queue on pending tokens for both phases."""
    prompt, token = candidates(workers, request)
    return Route(join_shortest_queue(prompt, request.in_flight_tokens), join_shortest_queue(token, request.in_flight_tokens))


def cls(workers: Sequence[WorkerInfo], request: RoutingRequest) -> Route:
    """The paper's cluster-level scheduler: JSQ on the prompt work queued (`prompt_work`) for the prompt phase,
    the token worker with the least KV memory in use for the token phase."""
    prompt, token = candidates(workers, request)
    return Route(least_prompt_work(prompt, request.in_flight_tokens), least_kv_in_use(token, request.in_flight_tokens))


def round_robin(workers: Sequence[WorkerInfo], request: RoutingRequest) -> Route:
    prompt, token = candidates(workers, request)
    return Route(prompt[request.sequence % len(prompt)], token[request.sequence % len(token)])


def uniform_random(workers: Sequence[WorkerInfo], request: RoutingRequest) -> Route:
    prompt, token = candidates(workers, request)
    rng = random.Random(request.sequence)
    return Route(rng.choice(prompt), rng.choice(token))


def token_phase(workers: Sequence[WorkerInfo], model: str, needed_kv_tokens: int, in_flight_tokens: Mapping[str, int],
                policy: str = "cls", sequence: int = 0) -> WorkerInfo:
    """The token worker alone, by `policy`'s token-phase rule: where a request resumes when its own died."""
    request = RoutingRequest(model, 0, needed_kv_tokens, in_flight_tokens, sequence)
    token = sorted((w for w in workers if w.model == model and w.role in ("token", "mixed")
                    and w.kv_capacity_tokens >= needed_kv_tokens), key=lambda w: w.worker_id)
    if not token:
        raise NoWorkerAvailable(f"no other token worker serving this model can hold {needed_kv_tokens} tokens of KV")
    if policy == "cls":
        return least_kv_in_use(token, in_flight_tokens)
    if policy == "jsq":
        return join_shortest_queue(token, in_flight_tokens)
    if policy == "round_robin":
        return token[request.sequence % len(token)]
    if policy == "random":
        return random.Random(request.sequence).choice(token)
    raise ValueError(f"unknown routing policy {policy!r}; choose from {', '.join(POLICIES)}")


POLICIES: dict[str, Callable[[Sequence[WorkerInfo], RoutingRequest], Route]] = {
    "cls": cls, "jsq": jsq, "round_robin": round_robin, "random": uniform_random,
}


@dataclass(frozen=True)
class ConditionalDisaggregation:
    """A short prompt is prefilled on its token worker itself when the prompt pool is busy.

    Off when max_prompt_tokens is 0. "Busy": every prompt-phase candidate has at least busy_pending_tokens
    pending (with what this scheduler sent since its heartbeat).
    """

    max_prompt_tokens: int = 0
    busy_pending_tokens: int = 2048

    def apply(self, chosen: Route, workers: Sequence[WorkerInfo], request: RoutingRequest) -> Route:
        if chosen.colocated or not 0 < request.prompt_tokens <= self.max_prompt_tokens:
            return chosen
        prompt, _ = candidates(workers, request)
        if min(load(w, request.in_flight_tokens) for w in prompt) < self.busy_pending_tokens:
            return chosen
        return Route(chosen.token_worker, chosen.token_worker)


def route(workers: Sequence[WorkerInfo], model: str, needed_kv_tokens: int, in_flight_tokens: Mapping[str, int],
          policy: str = "cls", prompt_tokens: int = 0, sequence: int = 0,
          conditional: ConditionalDisaggregation = ConditionalDisaggregation()) -> Route:
    """Picks a prompt worker and a token worker at once by `policy`, then applies conditional disaggregation.

    A request whose prompt phase goes to a mixed-pool worker runs colocated there (mixed batching, no KV
    transfer), when that worker can hold it; a mixed worker may also be picked for the token phase alone.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown routing policy {policy!r}; choose from {', '.join(POLICIES)}")
    request = RoutingRequest(model, prompt_tokens, needed_kv_tokens, in_flight_tokens, sequence)
    chosen = POLICIES[policy](workers, request)
    prompt_worker = chosen.prompt_worker
    if prompt_worker.role == "mixed" and prompt_worker.kv_capacity_tokens >= needed_kv_tokens:
        chosen = Route(prompt_worker, prompt_worker)
    return conditional.apply(chosen, workers, request)
