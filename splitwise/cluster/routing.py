"""Routing policies: pure functions from the observed cluster state to a choice of workers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from splitwise.cluster.registry import WorkerInfo


class NoWorkerAvailable(Exception):
    pass


@dataclass(frozen=True)
class Route:
    prompt_worker: WorkerInfo
    token_worker: WorkerInfo


def load(worker: WorkerInfo, in_flight_tokens: Mapping[str, int]) -> int:
    """Pending tokens as the worker last reported them plus what this scheduler sent it since."""
    return worker.pending_tokens + in_flight_tokens.get(worker.worker_id, 0)


def join_shortest_queue(workers: Sequence[WorkerInfo], in_flight_tokens: Mapping[str, int]) -> WorkerInfo:
    if not workers:
        raise NoWorkerAvailable("no worker of this role is registered")
    return min(workers, key=lambda w: (load(w, in_flight_tokens), w.worker_id))


def route(
    workers: Sequence[WorkerInfo],
    model: str,
    needed_kv_tokens: int,
    in_flight_tokens: Mapping[str, int],
) -> Route:
    """Picks a prompt worker and a token worker at once (join-the-shortest-queue on pending tokens).

    A mixed worker can serve either phase; when it is picked for both, the request runs colocated there.

    Only workers serving the model qualify (the KV handshake between the pair checks the weights
    themselves), and only token workers whose KV capacity can ever hold the request.
    """
    same_model = [w for w in workers if w.model == model]
    prompt = [w for w in same_model if w.role in ("prompt", "mixed")]
    token = [w for w in same_model if w.role in ("token", "mixed") and w.kv_capacity_tokens >= needed_kv_tokens]
    if not prompt:
        raise NoWorkerAvailable("no prompt worker serving this model is registered")
    if not token:
        raise NoWorkerAvailable(f"no token worker serving this model can hold {needed_kv_tokens} tokens of KV")
    return Route(join_shortest_queue(prompt, in_flight_tokens), join_shortest_queue(token, in_flight_tokens))
