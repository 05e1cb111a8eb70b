"""The engine against transformers: single requests, mixed continuous batches, chunked prefill, preemption,
KV moved between two engine instances, and exact block accounting."""

import asyncio
import dataclasses
import random

import pytest
import torch

from splitwise.engine.block_manager import KVCapacityError
from splitwise.engine.llm_engine import Engine, EngineConfig
from splitwise.engine.model_runner import ModelRunner
from splitwise.engine.request_handle import Finished, RequestFailed, RequestHandle
from splitwise.engine.sampling import SampledToken, SamplingParams
from splitwise.engine.sequence import FinishReason
from splitwise.kv.chunks import decode_chunk, split_layer
from splitwise.kv.layout import KVLayout
from splitwise.model.attention import BatchLayout
from splitwise.model.weights import load_model, load_tokenizer
from tests.reference import hf_greedy, hf_model

PROMPTS = ["Hello, world", "The capital of France is", "def fib(n):", "a" * 300]


@pytest.fixture(scope="module")
def tiny(cache_dir):
    loaded = load_model("tiny-llama", cache_dir=cache_dir)
    return loaded, load_tokenizer(loaded.folder)


def kv_bytes(loaded, tokens: int) -> int:
    return ModelRunner.bytes_per_token(loaded, torch.float32) * tokens


def make_engine(loaded, kv_tokens: int = 8192, tokenizer=None, **overrides) -> Engine:
    config = EngineConfig(kv_memory_bytes=kv_bytes(loaded, kv_tokens), **overrides)
    return Engine(loaded, "cpu", config, tokenizer=tokenizer)


async def collect(handle: RequestHandle) -> tuple[list[int], FinishReason]:
    out = []
    while True:
        event = await handle.next_event()
        if isinstance(event, Finished):
            return out, event.reason
        out.append(event.token_id)


def test_prefill_logits_match_transformers(tiny):
    loaded, tokenizer = tiny
    ids = tokenizer.encode("The quick brown fox", add_special_tokens=False)
    c = loaded.config
    cache = torch.zeros(c.num_layers, c.num_kv_heads, 64, c.head_dim)
    layout = BatchLayout.build([(0, len(ids), torch.arange(len(ids)))], [True])
    ours = loaded.model(torch.tensor(ids), layout, cache, cache.clone())[0]
    theirs = hf_model(loaded.folder)(torch.tensor([ids])).logits[0, -1]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prompt", PROMPTS)
async def test_greedy_generation_equals_transformers(tiny, prompt):
    loaded, tokenizer = tiny
    engine = make_engine(loaded)
    try:
        ids = tokenizer.encode(prompt, add_special_tokens=False)
        out, _ = await collect(engine.submit("r", ids, SamplingParams(max_tokens=24)))
        assert out == hf_greedy(loaded.folder, ids, 24)
        assert engine.blocks.num_free == engine.blocks.num_blocks
    finally:
        engine.stop()


@pytest.mark.parametrize("mixed_batches", [False, True])
async def test_requests_of_different_lengths_join_and_leave_a_running_batch(tiny, mixed_batches):
    loaded, tokenizer = tiny
    engine = make_engine(loaded, mixed_batches=mixed_batches)
    steps = []  # (prefill, request ids prefilling, request ids decoding) of every step the engine ran
    run = engine.runner.run

    def recording(batch):
        prompts = len(batch.seqs) - batch.decodes if batch.prefill else 0
        steps.append((batch.prefill, {s.request_id for s in batch.seqs[:prompts]},
                      {s.request_id for s in batch.seqs[prompts:]}))
        return run(batch)

    engine.runner.run = recording
    try:
        prompts = [f"request {i}: " + "xy" * (7 * i) for i in range(8)]
        handles, firsts = [], []
        for i, prompt in enumerate(prompts):
            params = SamplingParams(max_tokens=8 + 5 * i, ignore_eos=i % 2 == 0)
            handles.append(engine.submit(f"r{i}", tokenizer.encode(prompt, add_special_tokens=False), params))
            firsts.append((await handles[-1].next_event()).token_id)  # the next arrives while this one decodes
        outs = await asyncio.gather(*(collect(h) for h in handles))
        for i, (prompt, first, (out, _)) in enumerate(zip(prompts, firsts, outs)):
            ids = tokenizer.encode(prompt, add_special_tokens=False)
            reference = hf_greedy(loaded.folder, ids, 8 + 5 * i)
            assert ([first] + out)[: len(reference)] == reference, i
        assert engine.blocks.num_free == engine.blocks.num_blocks
    finally:
        engine.stop()
    decoding = [ids for prefill, _, ids in steps if ids]
    # Joined: r1 decoded beside r0, and r7 beside some earlier request. Left: r7 decoded on after r0 was done.
    assert any({"r0", "r1"} <= ids for ids in decoding)
    assert any("r7" in ids and len(ids) > 1 for ids in decoding)
    last_r0 = max(i for i, ids in enumerate(decoding) if "r0" in ids)
    assert any("r7" in ids for ids in decoding[last_r0 + 1:])
    mixed = [step for step in steps if step[0] and step[1] and step[2]]
    assert bool(mixed) == mixed_batches  # mixed steps: a prompt prefilled while running sequences decode


async def test_prompts_longer_than_the_batch_budget_are_chunked_and_still_exact(tiny):
    loaded, tokenizer = tiny
    engine = make_engine(loaded, max_batch_tokens=32)
    try:
        ids = tokenizer.encode("a long prompt that needs several chunks " * 4, add_special_tokens=False)
        assert len(ids) > 3 * 32
        out, _ = await collect(engine.submit("long", ids, SamplingParams(max_tokens=16)))
        assert out == hf_greedy(loaded.folder, ids, 16)
    finally:
        engine.stop()


async def test_preempted_requests_are_recomputed_with_identical_output(tiny):
    loaded, tokenizer = tiny
    engine = make_engine(loaded, kv_tokens=160)  # 10 blocks: four requests of up to 70 tokens cannot all fit
    try:
        prompts = [f"story {i} begins" for i in range(4)]
        handles = [engine.submit(f"p{i}", tokenizer.encode(p, add_special_tokens=False),
                                 SamplingParams(max_tokens=50, ignore_eos=True)) for i, p in enumerate(prompts)]
        outs = await asyncio.gather(*(collect(h) for h in handles))
        assert sum(h.seq.num_preemptions for h in handles) > 0
        for prompt, (out, reason) in zip(prompts, outs):
            ids = tokenizer.encode(prompt, add_special_tokens=False)
            assert reason is FinishReason.LENGTH and len(out) == 50
            reference = hf_greedy(loaded.folder, ids, 50)
            assert out[: len(reference)] == reference
        assert engine.blocks.num_free == engine.blocks.num_blocks
    finally:
        engine.stop()


async def test_kv_exported_by_one_engine_continues_identically_in_another(tiny):
    loaded, tokenizer = tiny
    ids = tokenizer.encode("KV moves between machines layer by layer", add_special_tokens=False)
    prompt_engine, token_engine = make_engine(loaded), make_engine(loaded)
    layout = KVLayout.of(loaded.config, torch.float32, loaded.fingerprint)
    chunks = []
    params = SamplingParams(max_tokens=24)
    try:
        def export(layer, keys, values, start):
            chunks.extend(split_layer(layer, keys, values, start, layout, max_chunk_bytes=1000))

        handle = prompt_engine.submit("r", ids, params, prefill_only=True, on_layer_kv=export)
        first = await handle.next_event()
        assert isinstance(first, SampledToken)
        assert await handle.next_event() == Finished(FinishReason.PREFILLED)
        assert {c.layer for c in chunks} == set(range(loaded.config.num_layers))
        assert all(len(c.key) + len(c.value) <= 1000 for c in chunks)
        assert prompt_engine.blocks.num_free == prompt_engine.blocks.num_blocks

        target = token_engine.reserve("r", ids, params)
        for chunk in chunks:
            keys, values = decode_chunk(chunk, layout, len(ids))
            token_engine.write_kv(target, chunk.layer, chunk.token_start, keys, values)
        token_engine.start_decoding(target, first)
        rest, _ = await collect(target)
        assert [first.token_id, *rest] == hf_greedy(loaded.folder, ids, 24)
        assert token_engine.blocks.num_free == token_engine.blocks.num_blocks
    finally:
        prompt_engine.stop()
        token_engine.stop()


@pytest.mark.parametrize("scattered", [False, True])
async def test_a_run_of_layers_written_at_once_lands_where_layer_by_layer_writes_would(tiny, scattered):
    """A run is one slice copy per stretch of consecutive slots (or one index copy for a scattered table)."""
    loaded, _ = tiny
    config = loaded.config
    engine, reference = make_engine(loaded), make_engine(loaded)
    try:
        tokens, start = 197, 3  # 13 blocks of 16: scattered, more stretches than MAX_SLICED_STRETCHES
        ids = list(range(10, 10 + start + tokens))
        handles = [e.reserve("r", ids, SamplingParams(max_tokens=1)) for e in (engine, reference)]
        if scattered:  # blocks in reverse order: no two consecutive, one stretch per block
            for handle in handles:
                handle.seq.block_table.reverse()
        g = torch.Generator().manual_seed(0)
        shape = (config.num_layers, tokens, config.num_kv_heads, config.head_dim)
        keys, values = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        engine.write_kv(handles[0], 0, start, keys, values)
        for layer in range(config.num_layers):
            reference.write_kv(handles[1], layer, start, keys[layer], values[layer])
        for e, handle in ((engine, handles[0]), (reference, handles[1])):
            slots = e.runner.context_slots(handle.seq.block_table, start + tokens)[start:]
            assert torch.equal(e.runner.cache_keys[:, :, slots], keys.transpose(1, 2))
            assert torch.equal(e.runner.cache_values[:, :, slots], values.transpose(1, 2))
        untouched = engine.runner.context_slots(handles[0].seq.block_table, start)
        assert not engine.runner.cache_keys[:, :, untouched].any()  # nothing before `start` was written
    finally:
        engine.stop()
        reference.stop()


async def test_a_request_resumed_elsewhere_from_its_prompt_kv_and_its_output_so_far_goes_on_identically(tiny):
    """A token worker died after streaming some tokens: another one takes the prompt's KV (as kv_store kept
    it), recomputes the tokens already streamed, and samples exactly what the first one would have."""
    loaded, tokenizer = tiny
    ids = tokenizer.encode("a request that survives its token worker", add_special_tokens=False)
    reference = hf_greedy(loaded.folder, ids, 30)
    prompt_engine, token_engine = make_engine(loaded), make_engine(loaded)
    layout = KVLayout.of(loaded.config, torch.float32, loaded.fingerprint)
    chunks = []
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    try:
        def export(layer, keys, values, start):
            chunks.extend(split_layer(layer, keys, values, start, layout, max_chunk_bytes=4096))

        handle = prompt_engine.submit("r", ids, params, prefill_only=True, on_layer_kv=export)
        assert (await handle.next_event()).token_id == reference[0]
        assert len(reference) > 7
        for streamed in (1, 7, len(reference) - 1):
            resumed = token_engine.reserve(f"r/resume-{streamed}", ids, params)
            for chunk in chunks:
                keys, values = decode_chunk(chunk, layout, len(ids))
                token_engine.write_kv(resumed, chunk.layer, chunk.token_start, keys, values)
            token_engine.resume_decoding(resumed, reference[:streamed])
            rest, reason = await collect(resumed)
            output = reference[:streamed] + rest
            assert len(output) == 30 and reason is FinishReason.LENGTH, streamed
            assert output[: len(reference)] == reference, streamed  # transformers stops at end-of-sequence
            assert token_engine.blocks.num_free == token_engine.blocks.num_blocks
    finally:
        prompt_engine.stop()
        token_engine.stop()


async def test_a_request_resumed_by_recomputing_prompt_and_output_goes_on_identically(tiny):
    """Without kept KV the new worker recomputes the prompt and the tokens streamed, in one chunked prefill;
    a seeded sampler continues with the same draws, since they depend on the output position only."""
    loaded, tokenizer = tiny
    ids = tokenizer.encode("recomputed from scratch", add_special_tokens=False)
    engine = make_engine(loaded, max_batch_tokens=8)  # the recomputation spans several chunks
    try:
        for params in (SamplingParams(max_tokens=20, ignore_eos=True),
                       SamplingParams(max_tokens=20, ignore_eos=True, temperature=0.8, seed=7)):
            whole, _ = await collect(engine.submit("whole", ids, params))
            resumed, reason = await collect(engine.submit("resumed", ids, params, output_ids=whole[:9]))
            assert whole[:9] + resumed == whole and reason is FinishReason.LENGTH
        assert engine.blocks.num_free == engine.blocks.num_blocks
    finally:
        engine.stop()


async def test_a_reserved_request_whose_kept_kv_broke_off_recomputes_its_prompt_in_its_own_blocks(tiny):
    """The kept prompt KV stopped arriving part-way (junk in some layers' blocks): resuming without it recomputes
    prompt and streamed tokens over whatever was written, and the output is unchanged."""
    loaded, tokenizer = tiny
    ids = tokenizer.encode("a kept copy that never fully arrived", add_special_tokens=False)
    engine = make_engine(loaded)
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    heads, dim = loaded.config.num_kv_heads, loaded.config.head_dim
    try:
        whole, _ = await collect(engine.submit("whole", ids, params))
        resumed = engine.reserve("resumed", ids, params)
        junk = torch.full((len(ids), heads, dim), 1e4)
        for layer in range(2):
            engine.write_kv(resumed, layer, 0, junk, junk)
        engine.resume_decoding(resumed, whole[:6], prompt_kv_arrived=False)
        rest, reason = await collect(resumed)
        assert whole[:6] + rest == whole and reason is FinishReason.LENGTH
        assert engine.blocks.num_free == engine.blocks.num_blocks
    finally:
        engine.stop()


async def test_a_request_whose_kv_is_nan_fails_alone_and_the_batch_decoding_beside_it_goes_on_exactly(tiny):
    """A peer pushed KV holding NaN for one request. It fails with a plain reason; the requests decoding in the
    same batch (whose contexts are padded with its first block) and the requests given its blocks afterwards
    produce exactly what they produce without it."""
    loaded, tokenizer = tiny
    heads, dim = loaded.config.num_kv_heads, loaded.config.head_dim
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    prompts = [tokenizer.encode(f"ordinary request {i} says", add_special_tokens=False) for i in range(4)]
    long_prompt = [3 + i % 250 for i in range(190)]  # with its output, 14 of the 16 blocks below
    clean = make_engine(loaded)
    try:
        reference = [(await collect(clean.submit(f"r{i}", ids, params)))[0] for i, ids in enumerate(prompts)]
        long_reference, _ = await collect(clean.submit("long", long_prompt, params))
    finally:
        clean.stop()
    engine = make_engine(loaded, kv_tokens=16 * 16)  # small: later requests reuse the poisoned blocks
    try:
        poisoned_ids = list(range(10, 90))  # longer than the others, and first: it holds block 0
        poisoned = engine.reserve("poisoned", poisoned_ids, params)
        nan = torch.full((len(poisoned_ids), heads, dim), float("nan"))
        for layer in range(loaded.config.num_layers):
            engine.write_kv(poisoned, layer, 0, nan, nan)
        handles = [engine.submit(f"r{i}", ids, params) for i, ids in enumerate(prompts)]
        firsts = [(await handle.next_event()).token_id for handle in handles]  # all of them decoding now
        engine.start_decoding(poisoned, SampledToken(5, 0.0))
        with pytest.raises(RequestFailed, match="non-finite logits for this request") as failed:
            await collect(poisoned)
        assert failed.value.corrupt
        for first, handle, expected in zip(firsts, handles, reference):
            rest, reason = await collect(handle)
            assert [first, *rest] == expected and reason is FinishReason.LENGTH
        assert engine.blocks.num_free == engine.blocks.num_blocks
        after = [engine.submit("long", long_prompt, params), engine.submit("short", prompts[0], params)]
        assert [(await collect(h))[0] for h in after] == [long_reference, reference[0]]
        assert engine.blocks.num_free == engine.blocks.num_blocks and engine.num_requests == 0
    finally:
        engine.stop()


async def test_nan_kv_left_in_freed_blocks_never_reaches_the_requests_given_them_next(tiny):
    """A reservation whose KV (NaN) arrived is cancelled before it decodes: the requests that get its blocks, and
    read their stale tails and padding, produce exactly what they produce in a fresh engine."""
    loaded, _ = tiny
    heads, dim = loaded.config.num_kv_heads, loaded.config.head_dim
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    prompts = [[3 + i % 250 for i in range(190)], [5, 6, 7, 8, 9]]  # together, every block of the engine below
    clean = make_engine(loaded, kv_tokens=16 * 16)
    try:
        reference = [(await collect(clean.submit(f"r{i}", ids, params)))[0] for i, ids in enumerate(prompts)]
    finally:
        clean.stop()
    engine = make_engine(loaded, kv_tokens=16 * 16)
    try:
        cancelled = engine.reserve("cancelled", list(range(10, 90)), params)
        nan = torch.full((80, heads, dim), float("nan"))
        for layer in range(loaded.config.num_layers):
            engine.write_kv(cancelled, layer, 0, nan, nan)
        engine.abort("cancelled")
        handles = [engine.submit(f"r{i}", ids, params) for i, ids in enumerate(prompts)]
        assert [(await collect(h))[0] for h in handles] == reference
    finally:
        engine.stop()


async def test_an_engine_step_that_fails_ends_its_requests_with_a_plain_reason_and_the_engine_goes_on(tiny,
                                                                                                      monkeypatch):
    loaded, _ = tiny
    engine = make_engine(loaded)
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    try:
        run = engine.runner.run
        monkeypatch.setattr(engine.runner, "run", lambda batch: 1 / 0)
        with pytest.raises(RequestFailed) as failed:
            await collect(engine.submit("doomed", [5, 6, 7], params))
        assert not failed.value.corrupt
        assert "ZeroDivisionError" not in str(failed.value) and "the engine failed" in str(failed.value)
        assert engine.blocks.num_free == engine.blocks.num_blocks
        monkeypatch.setattr(engine.runner, "run", run)
        out, reason = await collect(engine.submit("next", [5, 6, 7], params))
        assert len(out) == 4 and reason is FinishReason.LENGTH
    finally:
        engine.stop()


async def test_a_failing_step_observer_or_step_bookkeeping_never_stops_the_engine(tiny, monkeypatch):
    loaded, _ = tiny
    engine = make_engine(loaded)
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    try:
        engine.on_step = lambda record: 1 / 0
        out, _ = await asyncio.wait_for(collect(engine.submit("observed", [5, 6, 7], params)), 30)
        assert len(out) == 4
        postprocess = engine._postprocess
        monkeypatch.setattr(engine, "_postprocess", lambda batch, results: [][0])
        with pytest.raises(RequestFailed):
            await asyncio.wait_for(collect(engine.submit("lost", [5, 6, 7], params)), 30)
        monkeypatch.setattr(engine, "_postprocess", postprocess)
        out, _ = await asyncio.wait_for(collect(engine.submit("next", [5, 6, 7], params)), 30)
        assert len(out) == 4
        assert engine.blocks.num_free == engine.blocks.num_blocks and engine.num_requests == 0
    finally:
        engine.stop()


async def test_requests_that_can_never_fit_are_refused_up_front(tiny):
    loaded, _ = tiny
    engine = make_engine(loaded, kv_tokens=64)
    try:
        with pytest.raises(KVCapacityError) as error:
            engine.submit("big", [5] * 40, SamplingParams(max_tokens=40))
        assert error.value.ever
        with pytest.raises(KVCapacityError) as full:
            engine.reserve("a", [5] * 48, SamplingParams(max_tokens=8))
            engine.reserve("b", [5] * 32, SamplingParams(max_tokens=8))
        assert not full.value.ever
        engine.abort("a")
        assert engine.blocks.num_free == engine.blocks.num_blocks
    finally:
        engine.stop()


async def test_blocks_return_to_all_free_after_a_randomized_run_with_cancellations(tiny):
    loaded, _ = tiny
    engine = make_engine(loaded, kv_tokens=400, max_batch_tokens=64)
    rng = random.Random(0)
    try:
        async def one(i: int):
            ids = [rng.randrange(3, loaded.config.vocab_size) for _ in range(rng.randint(1, 120))]
            params = SamplingParams(max_tokens=rng.randint(1, 60), temperature=rng.choice([0.0, 1.0]), seed=i,
                                    ignore_eos=rng.random() < 0.5)
            handle = engine.submit(f"r{i}", ids, params)
            if rng.random() < 0.4:  # cancelled somewhere along the way
                await asyncio.sleep(rng.random() * 0.05)
                engine.abort(f"r{i}")
            return await collect(handle)

        results = await asyncio.gather(*(one(i) for i in range(40)))
        assert {reason for _, reason in results} <= set(FinishReason) - {FinishReason.PREFILLED}
        assert engine.num_requests == 0
        assert engine.blocks.num_free == engine.blocks.num_blocks
    finally:
        engine.stop()


async def test_bfloat16_engine_generates_with_a_bfloat16_cache(cache_dir):
    loaded = load_model("tiny-llama", dtype="bfloat16", cache_dir=cache_dir)
    engine = Engine(loaded, "cpu", EngineConfig(kv_memory_bytes=1 << 20))
    try:
        assert engine.runner.cache_keys.dtype == torch.bfloat16
        out, reason = await collect(engine.submit("b", [5, 6, 7], SamplingParams(max_tokens=8, ignore_eos=True)))
        assert len(out) == 8 and reason is FinishReason.LENGTH
        assert all(0 <= t < loaded.config.vocab_size for t in out)
    finally:
        engine.stop()


def test_mixed_scheduling_puts_prompts_first_but_decodes_within_the_age_bound():
    from splitwise.engine.block_manager import BlockManager
    from splitwise.engine.scheduler import BatchScheduler
    from splitwise.engine.sequence import Sequence

    now = [0.0]
    scheduler = BatchScheduler(BlockManager(64, 16), max_batch_tokens=16, decode_age_bound_s=0.05,
                               clock=lambda: now[0])
    decoding = Sequence("d", [1, 2, 3], SamplingParams(), num_cached=3,
                        output=[SampledToken(4, 0.0)])
    scheduler.start_decoding(decoding)
    for i in range(3):
        scheduler.add(Sequence(f"p{i}", [5] * 16, SamplingParams()))

    def step() -> str:
        batch = scheduler.schedule()
        now[0] += 1.0 if batch.prefill else 0.01  # prefill steps are long, decode steps short
        scheduler.step_finished(batch)
        if batch.prefill:
            scheduler.waiting.popleft()  # prefilled
        return "P" if batch.prefill else "D"

    assert "".join(step() for _ in range(6)) == "PDPDPD"


def test_mixed_batches_decode_every_running_sequence_in_each_prefill_step_within_the_token_budget():
    from splitwise.engine.block_manager import BlockManager
    from splitwise.engine.scheduler import BatchScheduler, batch_work
    from splitwise.engine.sequence import Sequence

    scheduler = BatchScheduler(BlockManager(64, 16), max_batch_tokens=16, mixed_batches=True)
    decoding = [Sequence(f"d{i}", [1, 2, 3], SamplingParams(), num_cached=3, output=[SampledToken(4, 0.0)])
                for i in range(3)]
    for seq in decoding:
        scheduler.start_decoding(seq)
    scheduler.add(Sequence("p", [5] * 40, SamplingParams()))
    batch = scheduler.schedule()
    assert batch.prefill and batch.decodes == 3
    assert batch.seqs[-3:] == decoding and batch.spans[-3:] == [(3, 4)] * 3
    assert batch.spans[0] == (0, 13) and batch.samples[0] is False  # a chunk: 16 tokens less the 3 decodes
    assert batch_work(batch) == (13, 3)
    scheduler.step_finished(batch)
    scheduler.waiting.clear()
    assert not scheduler.schedule().prefill  # nothing waits: a plain decode step


async def test_the_token_that_ends_a_request_comes_with_its_end_and_the_engine_says_why(tiny):
    """Finished is the engine's word: the last token and its Finished arrive together (`RequestHandle.ended` right
    after that token, never after an earlier one), and a prompt-only sequence's engine says whether its request ends
    at its first token."""
    loaded, _ = tiny
    engine = make_engine(loaded)
    try:
        handle = engine.submit("r", [5, 6, 7, 8], SamplingParams(max_tokens=4, ignore_eos=True))
        ended_after = []
        for _ in range(4):
            event = await handle.next_event()
            assert not isinstance(event, Finished)
            ended = handle.ended()
            ended_after.append(ended.reason if ended else None)
        assert ended_after == [None, None, None, FinishReason.LENGTH]
        for max_tokens, expected in ((1, FinishReason.LENGTH), (2, None)):
            prompt_only = engine.submit(f"p{max_tokens}", [5, 6, 7], SamplingParams(max_tokens=max_tokens,
                                                                                     ignore_eos=True),
                                        prefill_only=True)
            await prompt_only.next_event()
            assert prompt_only.ended() == Finished(FinishReason.PREFILLED)
            assert engine.request_ends(prompt_only.seq) is expected
    finally:
        engine.stop()


def _ascii_pair(tokenizer, ids: list[int]) -> int:
    """Where two tokens in a row decode to one printable ASCII character each (the tiny model's bytes are mostly not
    text on their own)."""
    for i in range(len(ids) - 1):
        if all(len(c := tokenizer.decode([t])) == 1 and c.isascii() and c.isprintable() for t in ids[i:i + 2]):
            return i
    raise AssertionError("the reference output has no two ASCII characters in a row")


async def test_a_stop_string_ends_the_request_in_the_engine_at_the_token_that_completes_it(tiny):
    """Stop strings are the engine's stop condition: a request ends (STOP, its blocks freed) at the first token whose
    text completes one, here spanning two tokens; a resumed request finds one that spans the tokens an earlier
    attempt sampled and its first own one; a prompt-only sequence's engine says its request ends at its first token;
    an engine without a tokenizer refuses stop strings rather than ignoring them."""
    loaded, tokenizer = tiny
    engine = make_engine(loaded, tokenizer=tokenizer)
    try:
        ids = tokenizer.encode("The capital of France is", add_special_tokens=False)
        free, _ = await collect(engine.submit("free", ids, SamplingParams(max_tokens=40, ignore_eos=True)))
        at = _ascii_pair(tokenizer, free)
        stop = tokenizer.decode(free[at:at + 2])
        ends = next(k for k in range(1, len(free) + 1) if stop in tokenizer.decode(free[:k]).rstrip("\ufffd"))
        params = SamplingParams(max_tokens=40, ignore_eos=True, stop=("never here", stop))
        assert await collect(engine.submit("stopped", ids, params)) == (free[:ends], FinishReason.STOP)
        resumed = engine.submit("resumed", ids, params, output_ids=free[:ends - 1])
        assert await collect(resumed) == (free[ends - 1:ends], FinishReason.STOP)
        assert engine.blocks.num_free == engine.blocks.num_blocks

        # Prompt-only: the prompt and free[:at] make free[at] its first token, whose text is one ASCII character.
        for stop, ends_here in ((tokenizer.decode(free[at:at + 1]), FinishReason.STOP), ("never here", None)):
            first = engine.submit(f"first-{stop}", ids + free[:at], dataclasses.replace(params, stop=(stop,)),
                                  prefill_only=True)
            assert (await first.next_event()).token_id == free[at]
            assert engine.request_ends(first.seq) is ends_here
    finally:
        engine.stop()
    without = make_engine(loaded)
    try:
        with pytest.raises(ValueError, match="stop strings"):
            without.submit("r", ids, params)
        assert without.blocks.num_free == without.blocks.num_blocks
    finally:
        without.stop()
