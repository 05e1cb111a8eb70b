"""The mock engine: the real engine with compute replaced by a machine profile's modelled step times, tokens that
depend on the prefix only, and KV of the modelled size divided by the KV scale."""

import asyncio
import time

import pytest
import torch

from splitwise.engine.block_manager import BlockManager
from splitwise.engine.llm_engine import Engine, EngineConfig
from splitwise.engine.mock_runner import MockModelRunner
from splitwise.engine.sampling import SamplingParams
from splitwise.engine.scheduler import ScheduledBatch
from splitwise.engine.sequence import FinishReason, Sequence
from splitwise.kv.layout import KVLayout
from splitwise.model.mock import FIRST_WORD_TOKEN_ID, MOCK_VOCAB_SIZE, load_mock_model
from splitwise.sim.machines import resolve_profile
from tests.unit.test_engine import collect

PROFILE = "llama2-70b@dgx-a100"
FAST = 0.001  # time factor: a modelled 60 ms step takes 60 us


def runner_for(time_factor: float = FAST, kv_scale: float = 64.0, num_blocks: int = 1024) -> MockModelRunner:
    return MockModelRunner(load_mock_model(PROFILE, time_factor, kv_scale), "cpu", BlockManager(num_blocks, 16))


def prefill_batch(blocks: BlockManager, *prompts: list[int], params: SamplingParams = SamplingParams(),
                  **seq_options) -> ScheduledBatch:
    seqs = [Sequence(f"r{i}", list(p), params, **seq_options) for i, p in enumerate(prompts)]
    for seq in seqs:
        blocks.grow(seq.block_table, seq.num_tokens)
    return ScheduledBatch(True, seqs, [(0, s.num_tokens) for s in seqs], [True] * len(seqs))


def test_step_time_is_the_profiles_step_time_times_the_time_factor():
    runner = runner_for(time_factor=3.0)
    perf = resolve_profile(PROFILE).perf
    prefill = prefill_batch(runner.blocks, [5] * 100, [6] * 300)
    decode = ScheduledBatch(False, prefill.seqs, [(99, 100), (299, 300)], [True, True])
    assert runner.step_seconds(prefill) == pytest.approx(3.0 * perf.step_s(400, 0))
    assert runner.step_seconds(decode) == pytest.approx(3.0 * perf.step_s(0, 2))


def test_a_step_lasts_at_least_its_modelled_time():
    runner = runner_for(time_factor=0.5)
    batch = prefill_batch(runner.blocks, [7] * 64)
    started = time.perf_counter()
    runner.run(batch)
    assert time.perf_counter() - started >= runner.step_seconds(batch)


def test_tokens_depend_on_the_prefix_only():
    runner = runner_for()
    alone = runner.run(prefill_batch(runner.blocks, [10, 11, 12, 13]))
    batched = runner.run(prefill_batch(runner.blocks, [99] * 50, [10, 11, 12, 13]))
    other = runner.run(prefill_batch(runner.blocks, [10, 11, 12, 14]))
    assert alone[0].token_id == batched[1].token_id
    assert other[0].token_id != alone[0].token_id
    assert all(FIRST_WORD_TOKEN_ID <= t.token_id < MOCK_VOCAB_SIZE for t in alone + batched + other)


def test_a_mock_token_is_certain_and_its_top_logprobs_list_it_alone_when_asked():
    runner = runner_for()
    plain = runner.run(prefill_batch(runner.blocks, [10, 11, 12]))[0]
    asked = runner.run(prefill_batch(runner.blocks, [10, 11, 12],
                                     params=SamplingParams(logprobs=True, top_logprobs=5)))[0]
    assert plain.top_logprobs == () and plain.logprob == 0.0
    assert asked.top_logprobs == ((asked.token_id, 0.0),)


def test_exported_kv_is_the_modelled_size_divided_by_the_kv_scale():
    runner = runner_for(kv_scale=64.0)
    loaded = runner.loaded
    exported = []
    batch = prefill_batch(runner.blocks, [3] * 40,
                          on_layer_kv=lambda layer, k, v, start: exported.append((layer, k.clone(), v.clone(), start)))
    runner.run(batch)
    assert [layer for layer, *_ in exported] == list(range(resolve_profile(PROFILE).model.num_layers))
    sent_bytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for _, k, v, _ in exported)
    assert sent_bytes == 40 * loaded.sent_kv_bytes_per_token == 40 * loaded.modelled_kv_bytes_per_token // 64
    layout = KVLayout.of(loaded.config, runner.dtype, loaded.fingerprint)
    assert all(k.shape == (layout.num_kv_heads, 40, layout.head_dim) and start == 0 for _, k, _, start in exported)


def test_received_kv_is_checked_for_size_and_dropped():
    runner = runner_for()
    table: list[int] = []
    runner.blocks.grow(table, 20)
    width = runner.loaded.config.head_dim
    runner.write_kv(table, 0, 0, torch.zeros(20, 1, width, dtype=runner.dtype), torch.zeros(20, 1, width, dtype=runner.dtype))
    with pytest.raises(ValueError, match="expected"):
        runner.write_kv(table, 0, 0, torch.zeros(20, 1, width + 1, dtype=runner.dtype),
                        torch.zeros(20, 1, width + 1, dtype=runner.dtype))
    with pytest.raises(ValueError, match="outside the reservation"):
        runner.write_kv(table, 0, 30, torch.zeros(20, 1, width, dtype=runner.dtype),
                        torch.zeros(20, 1, width, dtype=runner.dtype))


def test_mock_engine_capacity_is_the_profiles_and_no_cache_is_allocated():
    loaded = load_mock_model(PROFILE, FAST, 64.0)
    engine = Engine(loaded, "cpu", EngineConfig(kv_memory_bytes=1 << 20), MockModelRunner)
    try:
        assert engine.blocks.capacity_tokens == loaded.kv_capacity_tokens // 16 * 16
        assert not hasattr(engine.runner, "cache_keys")
    finally:
        engine.stop()


async def test_mock_engine_output_is_deterministic_and_identical_when_resumed():
    engine = Engine(load_mock_model(PROFILE, FAST, 64.0), "cpu", EngineConfig(), MockModelRunner)
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    prompt = list(range(300, 340))
    try:
        first, reason = await asyncio.wait_for(collect(engine.submit("a", prompt, params)), 30)
        again, _ = await asyncio.wait_for(collect(engine.submit("b", prompt, params)), 30)
        resumed, _ = await asyncio.wait_for(collect(engine.submit("c", prompt, params, output_ids=first[:7])), 30)
    finally:
        engine.stop()
    assert reason is FinishReason.LENGTH and len(first) == 20
    assert again == first
    assert resumed == first[7:]
