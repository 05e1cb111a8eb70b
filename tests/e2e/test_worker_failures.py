"""Workers die (SIGKILL) under requests, and no client sees it.

A token worker dies while 20 greedy streams run: every stream goes on, on the other token worker, without an
error, and each whole output equals the no-failure output. Two ways back: the prompt's KV kept by kv_store
plus recomputation of the tokens already streamed (the default), and, with SPLITWISE_KV_KEEP=false,
recomputation of prompt and streamed tokens on the new worker.

With the kv_store dead as well, the kept copies are lost and the streams resume by recomputation.

A token worker hangs (SIGSTOP): keepalive finds it, and its streams resume the same way.

A prompt worker dies mid-prefill: the request is tried again on the other prompt worker.
"""

import asyncio
import random
import signal

import pytest

from splitwise.client import SplitwiseClient
from splitwise.model.weights import resolve_model
from tests.e2e.launched_cluster import launched_cluster, recoveries, run_streams
from tests.reference import assert_same_greedy_output, hf_greedy

pytestmark = pytest.mark.e2e

STREAMS = 20
MAX_TOKENS = 320  # long enough that the kill lands while most streams decode, on a loaded 2-core machine too


def workers_cluster(tmp_path, cache_dir, keep: bool = True, prompt_workers: int = 1, token_workers: int = 2,
                    **env: str):
    return launched_cluster(tmp_path, cache_dir, {"SPLITWISE_HEARTBEAT_S": "0.1", "SPLITWISE_KV_KEEP": str(keep).lower(),
                                                  **env}, prompt_workers=prompt_workers, token_workers=token_workers)


@pytest.mark.parametrize("keep, kv_store_dies, kv", [(True, False, "kv_store"), (False, False, "recompute"),
                                                     (True, True, "recompute")])
async def test_sigkill_of_a_token_worker_mid_decode_loses_no_stream(tmp_path, cache_dir, keep, kv_store_dies, kv):
    folder = resolve_model("tiny-llama", cache_dir)[1]
    rng = random.Random(5)
    prompts = [[rng.randrange(3, 250) for _ in range(rng.randrange(8, 90))] for _ in range(STREAMS)]
    with workers_cluster(tmp_path, cache_dir, keep) as cluster:
        victim = next(c for c in cluster.children if c.name == "token_worker-0")
        scheduler = next(c for c in cluster.children if c.name == "scheduler")
        if kv_store_dies:  # first: the prompt workers' copies fail (requests go on), and resumes recompute
            kv_store = next(c for c in cluster.children if c.name == "kv_store")
            kv_store.proc.send_signal(signal.SIGKILL)
            assert kv_store.proc.wait(10) == -signal.SIGKILL
        # The no-failure output, itself checked against transformers up to its end-of-sequence token.
        references = await run_streams(scheduler.address, prompts, MAX_TOKENS)
        for prompt, reference in zip(prompts[:5], references):
            expected = hf_greedy(folder, prompt, MAX_TOKENS)
            assert reference[: len(expected)] == expected
        outputs = await run_streams(scheduler.address, prompts, MAX_TOKENS, kill=lambda: victim.proc.send_signal(signal.SIGKILL))
        assert victim.proc.wait(10) == -signal.SIGKILL
        for i, (prompt, output, reference) in enumerate(zip(prompts, outputs, references)):
            assert_same_greedy_output(folder, prompt, output, reference, what=f"stream {i}")
        resumed = recoveries(scheduler.metrics_address)
        # The dead worker held about half of the streams; each resumed once, by the expected way (with the
        # kv_store dead, the token worker finds the kept copy gone and recomputes: still one resume each).
        assert resumed.get(("resume", kv), 0) >= 3, resumed
        assert set(resumed) <= {("resume", kv)}, resumed


async def test_a_token_worker_that_hangs_mid_decode_is_found_by_keepalive_and_its_streams_resume(tmp_path, cache_dir):
    """SIGSTOP: the worker's sockets stay open but nothing answers (a hung process, a host gone without closing its
    connections). The scheduler's keepalive pings go unanswered, its calls there fail, and the streams resume."""
    rng = random.Random(7)
    prompts = [[rng.randrange(3, 250) for _ in range(rng.randrange(8, 90))] for _ in range(8)]
    with workers_cluster(tmp_path, cache_dir, SPLITWISE_GRPC_KEEPALIVE_S="1") as cluster:
        victim = next(c for c in cluster.children if c.name == "token_worker-0")
        try:
            scheduler = next(c for c in cluster.children if c.name == "scheduler")
            references = await run_streams(scheduler.address, prompts, MAX_TOKENS)
            outputs = await run_streams(scheduler.address, prompts, MAX_TOKENS, kill=lambda: victim.proc.send_signal(signal.SIGSTOP))
            assert victim.proc.poll() is None  # hung, not dead
            folder = resolve_model("tiny-llama", cache_dir)[1]
            for i, (prompt, output, reference) in enumerate(zip(prompts, outputs, references)):
                assert_same_greedy_output(folder, prompt, output, reference, what=f"stream {i}")
            resumed = recoveries(scheduler.metrics_address)
            assert resumed.get(("resume", "kv_store"), 0) >= 1 and set(resumed) == {("resume", "kv_store")}, resumed
        finally:
            victim.proc.send_signal(signal.SIGKILL)


async def test_sigkill_of_a_prompt_worker_mid_prefill_retries_the_request_on_the_other(tmp_path, cache_dir):
    # Chunks of 2 tokens make a 900-token prefill take 450 engine steps (seconds): the kill lands inside it.
    prompt = [(11 * i) % 240 + 3 for i in range(900)]
    with workers_cluster(tmp_path, cache_dir, prompt_workers=2, token_workers=1, SPLITWISE_MAX_BATCH_TOKENS="2",
                         SPLITWISE_REGISTRY_REFRESH_S="0.02") as cluster:
        scheduler = next(c for c in cluster.children if c.name == "scheduler")
        prompt_workers = {c.name: c for c in cluster.children if c.name.startswith("prompt_worker")}
        async with SplitwiseClient(scheduler.address) as client:
            reference = await client.generate(token_ids=prompt, max_tokens=12, ignore_eos=True, timeout=120)
            # Heartbeats lag: until both prompt workers report an empty queue, a busy one may be the reference's.
            for _ in range(300):
                status = await client.cluster_status()
                if all(w.pending_tokens == 0 for w in status.workers if w.worker_id in prompt_workers):
                    break
                await asyncio.sleep(0.1)
            request = asyncio.create_task(client.generate(token_ids=prompt, max_tokens=12, ignore_eos=True,
                                                          timeout=120))
            busy = None
            for _ in range(400):  # the worker prefilling it says so in its heartbeat
                status = await client.cluster_status()
                busy = next((w.worker_id for w in status.workers
                             if w.worker_id in prompt_workers and w.pending_tokens > 0), None)
                if busy or request.done():
                    break
                await asyncio.sleep(0.01)
            assert busy and not request.done(), "the prefill was not seen running"
            prompt_workers[busy].proc.send_signal(signal.SIGKILL)
            out = await request  # no error: tried again on the other prompt worker
        assert out.token_ids == reference.token_ids and out.finish_reason == "length"
        recovered = recoveries(scheduler.metrics_address)
        assert recovered == {("retry", "recompute"): 1}, f"not killed mid-prefill: {recovered}"
