"""The engine against transformers, and KV moved between two engine instances."""

import pytest
import torch

from splitwise.engine.kv_cache import KVCapacityError, KVPool
from splitwise.engine.runner import ModelRunner
from splitwise.engine.sampling import SamplingParams
from splitwise.kv.chunks import split_layer, write_chunk
from splitwise.kv.layout import KVLayout
from splitwise.model.weights import load_model, load_tokenizer
from tests.reference import hf_greedy, hf_model

PROMPTS = ["Hello, world", "The capital of France is", "def fib(n):", "a" * 300]
GREEDY = SamplingParams(max_tokens=24)


@pytest.fixture(scope="module")
def tiny(cache_dir):
    loaded = load_model("tiny-llama", cache_dir=cache_dir)
    return loaded, load_tokenizer(loaded.folder)


def make_runner(cache_dir) -> tuple[ModelRunner, KVPool]:
    loaded = load_model("tiny-llama", cache_dir=cache_dir)
    return ModelRunner(loaded, "cpu"), KVPool(loaded.config, 10_000, "cpu", torch.float32)


def generate(runner: ModelRunner, pool: KVPool, ids: list[int], params: SamplingParams) -> list[int]:
    kv = pool.reserve("r", len(ids) + params.max_tokens)
    try:
        out = [runner.prefill(ids, params, kv).first.token_id]
        while len(out) < params.max_tokens and out[-1] not in runner.loaded.eos_token_ids:
            out.append(runner.decode_step(out[-1], kv, params, len(out)).token_id)
        return out
    finally:
        pool.free("r")


def test_prefill_logits_match_transformers(tiny):
    loaded, tokenizer = tiny
    ids = tokenizer.encode("The quick brown fox", add_special_tokens=False)
    pool = KVPool(loaded.config, 1000, "cpu", torch.float32)
    kv = pool.reserve("r", len(ids))
    ours = loaded.model(torch.tensor(ids), 0, kv.keys, kv.values)
    theirs = hf_model(loaded.folder)(torch.tensor([ids])).logits[0, -1]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_generation_equals_transformers(tiny, cache_dir, prompt):
    loaded, tokenizer = tiny
    runner, pool = make_runner(cache_dir)
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    assert generate(runner, pool, ids, GREEDY) == hf_greedy(loaded.folder, ids, GREEDY.max_tokens)


def test_kv_exported_by_one_engine_continues_identically_in_another(tiny, cache_dir):
    loaded, tokenizer = tiny
    ids = tokenizer.encode("KV moves between machines layer by layer", add_special_tokens=False)
    sender, sender_pool = make_runner(cache_dir)
    receiver, receiver_pool = make_runner(cache_dir)
    layout = KVLayout.of(loaded.config, torch.float32, loaded.fingerprint)
    chunks = []

    def export(layer, keys, values):
        chunks.extend(split_layer(layer, keys, values, 0, layout, max_chunk_bytes=1000))

    kv_out = sender_pool.reserve("export", len(ids))
    first = sender.prefill(ids, GREEDY, kv_out, export).first
    assert {c.layer for c in chunks} == set(range(loaded.config.num_layers))
    assert all(c.num_bytes <= 1000 for c in chunks)

    kv_in = receiver_pool.reserve("r", len(ids) + GREEDY.max_tokens)
    for chunk in chunks:
        write_chunk(kv_in, chunk, layout)
    kv_in.length = len(ids)
    out = [first.token_id]
    while len(out) < GREEDY.max_tokens and out[-1] not in loaded.eos_token_ids:
        out.append(receiver.decode_step(out[-1], kv_in, GREEDY, len(out)).token_id)
    assert out == generate(sender, sender_pool, ids, GREEDY)


def test_kv_pool_accounts_exactly_and_refuses_what_does_not_fit(tiny):
    loaded, _ = tiny
    pool = KVPool(loaded.config, 100, "cpu", torch.float32)
    pool.reserve("a", 60)
    with pytest.raises(KVCapacityError) as full:
        pool.reserve("b", 50)
    assert not full.value.ever
    with pytest.raises(KVCapacityError) as never:
        pool.reserve("c", 101)
    assert never.value.ever
    assert pool.used_tokens == 60
    assert pool.free("a") and not pool.free("a")
    assert pool.used_tokens == 0 and pool.num_requests == 0
