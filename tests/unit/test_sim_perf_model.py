"""The simulator's inputs: step times interpolated from profiled points, the paper's machines and model shapes, cluster
designs read from text, and when a prompt's KV reaches its token machine."""

from __future__ import annotations

import pytest

from splitwise.sim.designs import parse_design
from splitwise.sim.kv_model import KVLink
from splitwise.sim.machines import MACHINES, MODELS, paper_profile
from splitwise.sim.perf_model import PAPER_PROFILES, PerfModel, read_profiles


def model(prompt_points, token_points=((1, 0.01),)) -> PerfModel:
    return PerfModel("toy", "toy-gpu", 1, prompt_points=prompt_points, token_points=token_points)


# -- interpolation --------------------------------------------------------------------------------------------

def test_step_times_at_profiled_points_are_the_profiled_times():
    perf = model(((100, 1.0), (200, 3.0), (400, 4.0)), ((1, 0.02), (8, 0.03)))
    assert [perf.prefill_s(x) for x in (100, 200, 400)] == [1.0, 3.0, 4.0]
    assert [perf.decode_s(b) for b in (1, 8)] == [0.02, 0.03]


def test_step_times_between_profiled_points_are_linear():
    perf = model(((100, 1.0), (200, 3.0), (400, 4.0)))
    assert perf.prefill_s(150) == pytest.approx(2.0)
    assert perf.prefill_s(300) == pytest.approx(3.5)
    assert perf.prefill_s(125) == pytest.approx(1.5)


def test_extrapolation_follows_the_end_segment():
    perf = model(((100, 1.0), (200, 3.0), (400, 4.0)))
    assert perf.prefill_s(800) == pytest.approx(6.0)
    assert perf.prefill_s(75) == pytest.approx(0.5)


def test_extrapolation_never_goes_below_half_the_smallest_profiled_time():
    rising = model(((100, 1.0), (200, 3.0)))
    falling = model(((100, 1.0), (200, 0.4)))
    assert rising.prefill_s(1) == 0.5
    assert falling.prefill_s(10_000) == 0.2


def test_the_paper_profile_hits_its_own_points():
    perf = paper_profile("llama2-70b", "dgx-a100").perf
    assert all(perf.prefill_s(x) == y for x, y in perf.prompt_points)
    assert all(perf.decode_s(x) == y for x, y in perf.token_points)


def test_a_mixed_step_costs_a_prefill_over_all_its_tokens_and_never_less_than_the_decode_alone():
    perf = model(((1, 0.1), (1001, 1.1)), ((1, 0.5),))
    assert perf.step_s(500, 0) == pytest.approx(0.599)
    assert perf.step_s(0, 4) == 0.5
    assert perf.step_s(600, 100) == pytest.approx(perf.prefill_s(700))
    assert perf.step_s(10, 4) == 0.5
    assert perf.step_s(0, 0) == 0.0


def test_a_profile_point_that_is_not_positive_is_refused():
    with pytest.raises(ValueError, match="must be positive"):
        model(((0, 1.0),))
    with pytest.raises(ValueError, match="must be positive"):
        model(((10, 1.0),), ((1, 0.0),))


# -- the paper's profiles -------------------------------------------------------------------------------------

def test_decode_by_batch_size_grows_with_the_batch_and_splitwisesim_reading_is_almost_flat():
    by_batch = paper_profile("llama2-70b", "dgx-a100", decode_curve="batch_size").perf
    splitwisesim = paper_profile("llama2-70b", "dgx-a100", decode_curve="splitwisesim").perf
    assert by_batch.decode_s(64) == pytest.approx(0.0716, abs=0.001)
    assert splitwisesim.decode_s(64) == pytest.approx(0.043, abs=0.001)
    assert splitwisesim.decode_s(2048) == pytest.approx(splitwisesim.decode_s(1), rel=0.1)


def test_the_tbt_reference_is_read_as_the_decode_curve_is():
    """SplitwiseSim's reference for a request's TBT is its token curve read at the request's prompt size; by the
    batch-size reading it is one sequence's step, whatever the prompt."""
    from splitwise.sim.simulator import idle_baseline
    splitwisesim = paper_profile("llama2-70b", "dgx-a100", decode_curve="splitwisesim")
    by_batch = paper_profile("llama2-70b", "dgx-a100", decode_curve="batch_size")
    for prompt in (128, 2048, 8192):
        assert idle_baseline(splitwisesim).tbt(prompt) == pytest.approx(splitwisesim.perf.decode_s(prompt))
        assert idle_baseline(by_batch).tbt(prompt) == pytest.approx(by_batch.perf.decode_s(1))
    assert idle_baseline(splitwisesim).tbt(8192) > 1.1 * idle_baseline(splitwisesim).tbt(128)
    assert splitwisesim.perf.scaled(1.3).decode_curve == "splitwisesim"


def test_power_capped_h100_prefills_1_3x_slower_and_decodes_as_fast():
    h100 = paper_profile("llama2-70b", "dgx-h100").perf
    capped = paper_profile("llama2-70b", "dgx-h100-pcap").perf
    for tokens in (512, 2048, 8192):
        assert capped.prefill_s(tokens) / h100.prefill_s(tokens) == pytest.approx(1.3, rel=0.05)
    for batch in (1, 8, 64):
        assert capped.decode_s(batch) == pytest.approx(h100.decode_s(batch), rel=0.05)


def test_llama2_70b_kv_per_token_counts_its_8_gqa_kv_heads():
    assert MODELS["llama2-70b"].kv_bytes_per_token == 2 * 80 * 8 * 128 * 2


def test_machine_costs_and_rated_powers_are_the_papers():
    costs = {name: (m.cost_per_hour, m.power_kw) for name, m in MACHINES.items()}
    assert costs == {"dgx-a100": (17.6, 6.5), "dgx-h100": (38.0, 10.2), "dgx-h100-pcap": (38.0, 7.14)}


def test_the_shipped_profile_carries_its_mit_notice():
    readme = (PAPER_PROFILES.parent / "README.md").read_text()
    assert "MIT License" in readme
    assert "Copyright (c) 2024 Pratyush Patel" in readme
    assert "THE SOFTWARE IS PROVIDED \"AS IS\"" in readme


def test_a_csv_with_the_wrong_columns_is_refused_with_the_missing_ones_named(tmp_path):
    path = tmp_path / "wrong.csv"
    path.write_text("model,hardware,latency\nm,h,1\n")
    with pytest.raises(ValueError, match=r"not a performance profile; columns .*'prompt_time'.* are missing"):
        read_profiles(path)


def test_an_unknown_decode_curve_is_refused():
    with pytest.raises(ValueError, match="unknown decode curve 'median'"):
        read_profiles(PAPER_PROFILES, decode_curve="median")


# -- designs ------------------------------------------------------------------------------------------------

def test_a_baseline_design_is_colocated_machines_of_one_type():
    design = parse_design("baseline:3*dgx-a100")
    assert (design.machines, design.count("mixed"), design.split, design.short) == (3, 3, False, "3")
    assert design.cost_per_hour == pytest.approx(3 * 17.6)
    assert design.power_kw == pytest.approx(3 * 6.5)


def test_a_splitwise_design_names_its_prompt_and_token_machines():
    design = parse_design("splitwise:2*dgx-h100+1*dgx-a100")
    pools = [(p.role, p.profile.machine.name, p.count) for p in design.pools]
    assert pools == [("prompt", "dgx-h100", 2), ("token", "dgx-a100", 1)]
    assert (design.split, design.short) == (True, "2P+1T")
    assert design.cost_per_hour == pytest.approx(2 * 38.0 + 17.6)
    assert design.pools[0].profile.model.name == "llama2-70b"


@pytest.mark.parametrize("text", ["garbage", "baseline:", "baseline:0*dgx-a100", "baseline:x*dgx-a100",
                                  "splitwise:2*dgx-h100", "colocated:3*dgx-a100"])
def test_a_design_that_is_not_one_is_refused_with_the_syntax(text):
    with pytest.raises(ValueError, match=r"write baseline:N\*MACHINE or splitwise:P\*MACHINE\+T\*MACHINE"):
        parse_design(text)


def test_a_design_with_an_unknown_machine_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown machine type 'dgx-b200'; choose from dgx-a100"):
        parse_design("baseline:3*dgx-b200")


# -- KV transfer ----------------------------------------------------------------------------------------------

LINK = KVLink(bytes_per_s=1e9, per_transfer_s=0.005)  # 2 GB of KV: 2 s on the link


def test_layerwise_kv_of_a_long_prefill_arrives_one_layer_after_the_prefill_ends():
    # max(3.0 + 2/80, 1.0 + 2) + 0.005
    assert LINK.arrival_s(2e9, 80, prefill_start_s=1.0, prefill_end_s=3.0, layerwise=True) == pytest.approx(3.03)


def test_layerwise_kv_of_a_short_prefill_arrives_when_the_link_has_sent_it_all():
    # max(1.5 + 2/80, 1.0 + 2) + 0.005
    assert LINK.arrival_s(2e9, 80, prefill_start_s=1.0, prefill_end_s=1.5, layerwise=True) == pytest.approx(3.005)


def test_kv_sent_after_the_prefill_arrives_a_whole_transfer_later():
    assert LINK.arrival_s(2e9, 80, prefill_start_s=1.0, prefill_end_s=3.0, layerwise=False) == pytest.approx(5.005)


def test_a_context_aware_profile_reads_decode_steps_over_batch_size_and_mean_context():
    from splitwise.sim.perf_model import PerfModel

    grid = ((1, 100, 0.010), (1, 1100, 0.020), (9, 100, 0.030), (9, 1100, 0.070))
    perf = PerfModel("m", "h", 1, ((1, 0.1),), ((1, 0.015), (9, 0.05)), decode_grid=grid)
    assert perf.context_aware
    assert perf.decode_s(1, 100) == pytest.approx(0.010) and perf.decode_s(9, 1100) == pytest.approx(0.070)
    assert perf.decode_s(5, 600) == pytest.approx((0.015 + 0.050) / 2)  # linear in both
    assert perf.decode_s(9) == pytest.approx(0.05)  # without a context: the batch-size curve
    assert perf.step_s(0, 9, 1100) == pytest.approx(0.070)


def test_the_measured_tiny_llama_profile_is_context_aware():
    from pathlib import Path

    from splitwise.sim.machines import resolve_profile

    perf = resolve_profile(str(Path(__file__).resolve().parents[2] / "bench/profiles/tiny-llama-cpu.csv")).perf
    assert perf.context_aware
    assert perf.decode_s(64, 1014) > perf.decode_s(64, 16)
