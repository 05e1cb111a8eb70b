"""splitwise/slo.py and bench/slo_plots.py: percentiles, idle baselines, slowdowns, the paper's nine SLOs and goodput, on hand-made latencies."""

import json
import math

import numpy as np
import pytest

from splitwise.slo import (PAPER_SLOS, IdleBaseline, RequestResult, format_report, goodput, percentile, read_csv,
                       slo_attainment, slowdowns, summarize, write_csv)
from bench.slo_plots import plot_goodput, plot_latency_cdfs

# Idle TTFT 0.1 s at 100 prompt tokens, 0.2 s at 200, 0.3 s at 400; idle TBT = context * 0.1 ms.
BASELINE = IdleBaseline(ttft_points=[(100, 0.1), (200, 0.2), (400, 0.3)], tbt_points=[(100, 0.010), (200, 0.020)])
# Constant idle latencies: TTFT 0.1 s, TBT 0.01 s, so E2E of 101 output tokens is 0.1 + 100 * 0.01 = 1.1 s.
FLAT = IdleBaseline(ttft_points=[(1000, 0.1)], tbt_points=[(1000, 0.01)])


def result(request_id, prompt_tokens, ttft_s, tbt_s, arrival_s=0.0, error=""):
    e2e_s = None if ttft_s is None or error else ttft_s + sum(tbt_s)
    return RequestResult(request_id, arrival_s, prompt_tokens, len(tbt_s) + 1 if ttft_s is not None else 0, ttft_s,
                         list(tbt_s), e2e_s, error)


def flat_request(i, ttft_slowdown=1.0, tbt_slowdown=1.0, output_tokens=101):
    return result(f"r{i}", 1000, 0.1 * ttft_slowdown, [0.01 * tbt_slowdown] * (output_tokens - 1), arrival_s=i)


def test_percentile_matches_numpy_linear_interpolation():
    values = np.random.default_rng(0).lognormal(size=37).tolist()
    for q in (0, 1, 25, 50, 90, 99, 99.9, 100):
        assert percentile(values, q) == pytest.approx(np.percentile(values, q), rel=1e-12)
    assert percentile([3.0], 99) == 3.0


def test_percentile_of_nothing_or_outside_0_to_100_raises():
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_percentile_reaching_an_infinite_value_is_infinite_and_one_below_it_is_not():
    assert percentile([1.0, 2.0, math.inf], 50) == 2.0
    assert percentile([1.0, 2.0, math.inf], 75) == math.inf
    assert percentile([1.0, math.inf, math.inf], 100) == math.inf


def test_request_result_tbt_properties():
    r = result("a", 10, 0.5, [0.1, 0.3, 0.2])
    assert r.ok and r.output_tokens == 4 and r.tbt_mean_s == pytest.approx(0.2) and r.tbt_max_s == 0.3
    one_token = result("b", 10, 0.5, [])
    assert one_token.ok and one_token.tbt_mean_s is None and one_token.tbt_max_s is None
    assert not result("c", 10, None, []).ok and not result("d", 10, 0.5, [0.1], error="UNAVAILABLE").ok


def test_summarize_counts_percentiles_and_throughput_over_first_arrival_to_last_completion():
    results = [result("a", 10, 0.2, [0.1, 0.1], arrival_s=1.0),  # done at 1.4
               result("b", 10, 0.4, [0.2, 0.3, 0.1], arrival_s=2.0),  # done at 3.0
               result("c", 10, None, [], arrival_s=0.5, error="DEADLINE_EXCEEDED")]
    s = summarize(results)
    assert (s["requests"], s["ok"], s["failed"]) == (3, 2, 1)
    assert s["duration_s"] == pytest.approx(2.5)
    assert s["throughput_rps"] == pytest.approx(2 / 2.5)
    assert s["throughput_tokens_per_s"] == pytest.approx((3 + 4) / 2.5)
    assert s["ttft_p50_s"] == pytest.approx(0.3)
    assert s["tbt_p90_s"] == pytest.approx(np.percentile([0.1, 0.1, 0.2, 0.3, 0.1], 90))
    assert s["e2e_p99_s"] == pytest.approx(np.percentile([0.4, 1.0], 99))


def test_summarize_of_no_successes_has_no_percentiles():
    s = summarize([result("c", 10, None, [], error="UNAVAILABLE")])
    assert (s["ok"], s["failed"], s["throughput_rps"], s["ttft_p50_s"], s["tbt_p99_s"]) == (0, 1, 0.0, None, None)


def test_baseline_interpolates_between_measured_lengths_and_extrapolates_the_end_segments():
    assert BASELINE.ttft(150) == pytest.approx(0.15)
    assert BASELINE.ttft(300) == pytest.approx(0.25)
    assert BASELINE.ttft(600) == pytest.approx(0.4)  # the 200..400 segment continued
    assert BASELINE.ttft(80) == pytest.approx(0.08)  # the 100..200 segment continued
    assert BASELINE.ttft(0) == pytest.approx(0.05)  # floored at half the smallest measurement
    assert BASELINE.tbt(150) == pytest.approx(0.015)
    assert BASELINE.e2e(100, 3) == pytest.approx(0.1 + 2 * 0.01015)  # 2 gaps at the mean context 101.5
    assert BASELINE.e2e(400, 1) == pytest.approx(0.3)


def test_baseline_averages_repeated_lengths_and_survives_json():
    baseline = IdleBaseline(ttft_points=[(200, 0.3), (100, 0.1), (200, 0.1)], tbt_points=[(50, 0.02)])
    assert baseline.ttft_points == ((100, 0.1), (200, 0.2))
    assert baseline.tbt(5000) == 0.02  # one point: constant
    assert IdleBaseline.from_dict(json.loads(json.dumps(baseline.to_dict()))) == baseline
    with pytest.raises(ValueError):
        IdleBaseline(ttft_points=[], tbt_points=[(50, 0.02)])


def test_slowdowns_of_three_requests_by_hand():
    a = result("a", 100, 0.2, [0.0101, 0.0306])  # idle TTFT 0.1; idle gaps at contexts 101, 102: 0.0101, 0.0102
    b = result("b", 200, 0.2, [0.0402])  # idle TTFT 0.2; idle gap at context 201: 0.0201
    c = result("c", 400, 0.9, [])  # idle TTFT 0.3; no gaps
    failed = result("d", 100, None, [], error="UNAVAILABLE")
    s = slowdowns([a, b, c, failed], BASELINE)
    assert s["ttft"] == pytest.approx([2.0, 1.0, 3.0])
    assert s["tbt"] == pytest.approx([1.0, 3.0, 2.0])
    assert s["e2e"] == pytest.approx([0.2407 / (0.1 + 2 * 0.01015), 0.2402 / (0.2 + 0.0201), 3.0])


def test_request_mean_tbt_is_the_time_after_the_first_token_over_the_output_tokens_as_splitwisesim_measures():
    # SplitwiseSim: tbt = (response time - TTFT) / token_size, against its token time at the prompt's size.
    a = result("a", 100, 0.2, [0.0101, 0.0306])  # 3 tokens, 0.0407 s after the first; idle gap at 100: 0.010
    b = result("b", 200, 0.2, [0.0402])  # 2 tokens, 0.0402 s after the first; idle gap at 200: 0.020
    c = result("c", 400, 0.9, [])  # 1 token: nothing after the first
    s = slowdowns([a, b, c], BASELINE, tbt="request_mean")
    assert s["tbt"] == pytest.approx([0.0407 / 3 / 0.010, 0.0402 / 2 / 0.020, 0.0])
    assert s["ttft"] == slowdowns([a, b, c], BASELINE)["ttft"]


def test_attainment_holds_when_every_request_runs_at_idle_speed():
    report = slo_attainment([flat_request(i) for i in range(100)], FLAT)
    assert report.all_met and report.failed == 0 and len(report.checks) == 9
    assert all(c.slowdown == pytest.approx(1.0) for c in report.checks)
    assert report.check("tbt", 99).limit == PAPER_SLOS["tbt"][99]


def test_attainment_fails_on_p99_ttft_alone():
    # 2 of 100 requests wait 7x for their first token: P99 TTFT (rank 98.01) is 7x > 6x, P90 TTFT still 1x, and
    # their E2E, 0.7 + 1.0 against 1.1 idle, stays under every E2E limit.
    results = [flat_request(i, ttft_slowdown=7.0 if i < 2 else 1.0) for i in range(100)]
    report = slo_attainment(results, FLAT)
    assert [(c.metric, c.percentile) for c in report.checks if not c.met] == [("ttft", 99)]
    assert report.slowdown("ttft", 99) == pytest.approx(7.0)
    assert not report.all_met


def test_a_failed_request_fails_the_run_even_when_the_percentiles_hold():
    results = [flat_request(i) for i in range(100)] + [result("dead", 1000, None, [], error="UNAVAILABLE")]
    report = slo_attainment(results, FLAT)
    assert report.failed == 1 and all(c.met for c in report.checks) and not report.all_met


def test_failed_requests_count_as_infinite_slowdowns():
    results = [flat_request(i) for i in range(10)] + [result(f"lost{i}", 1000, None, []) for i in range(2)]
    report = slo_attainment(results, FLAT)
    assert report.failed == 2
    assert report.slowdown("ttft", 99) == math.inf and report.slowdown("ttft", 50) == pytest.approx(1.0)


def test_goodput_is_the_highest_rate_before_the_first_failure():
    sweep = [(1.0, True), (4.0, False), (2.0, True), (5.0, True), (3.0, True)]
    assert goodput(sweep) == 3.0  # 5 req/s met, but 4 did not
    assert goodput([(1.0, False), (2.0, True)]) is None
    assert goodput([]) is None


def test_csv_round_trip_keeps_the_token_gaps_beside_the_csv(tmp_path):
    results = [result("a", 10, 0.25, [0.1, 0.3], arrival_s=0.125),
               result("b,quoted", 20, None, [], arrival_s=1.5, error='UNAVAILABLE: "worker, gone"')]
    write_csv(results, tmp_path / "requests.csv")
    assert (tmp_path / "requests.gaps.jsonl").exists()
    assert read_csv(tmp_path / "requests.csv") == results
    header, first = (tmp_path / "requests.csv").read_text().splitlines()[:2]
    assert header.split(",")[5:7] == ["tbt_mean_s", "tbt_max_s"] and first.split(",")[5:7] == ["0.2", "0.3"]


def test_csv_without_its_gaps_file_reads_back_without_gaps(tmp_path):
    results = [result("a", 10, 0.25, [0.1, 0.3], arrival_s=0.125)]
    write_csv(results, tmp_path / "requests.csv", with_gaps=False)
    (row,) = read_csv(tmp_path / "requests.csv")
    assert row.tbt_s == [] and row.tbt_mean_s is None
    assert (row.request_id, row.arrival_s, row.output_tokens, row.ttft_s, row.e2e_s) == ("a", 0.125, 3, 0.25, 0.65)


def test_format_report_is_a_markdown_table_of_latencies_and_slo_checks():
    results = [flat_request(i, ttft_slowdown=7.0 if i < 2 else 1.0) for i in range(100)]
    text = format_report(summarize(results), slo_attainment(results, FLAT))
    assert "| TTFT | 100.0 | 100.0 | 700.0 |" in text
    assert "| P99 TTFT | 7.00x | 6x | **no** |" in text and "**SLOs not met**" in text


def test_plots_write_png_files(tmp_path):
    configs = {"splitwise": [flat_request(i, tbt_slowdown=1 + i / 50, output_tokens=6) for i in range(50)],
               "baseline": [flat_request(i, ttft_slowdown=2.0, output_tokens=6) for i in range(50)]
               + [result("dead", 1000, None, [], error="UNAVAILABLE")]}
    plot_latency_cdfs(configs, tmp_path / "cdf.png")
    sweeps = {"splitwise": [(1.0, True, 1.1), (2.0, True, 2.0), (3.0, False, 6.0)],
              "baseline": [(1.0, True, 1.5), (2.0, False, math.inf)], "no tbt samples": [(1.0, True, None)]}
    plot_goodput(sweeps, tmp_path / "goodput.png")
    for name in ("cdf.png", "goodput.png"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000


def test_engine_work_of_a_run_is_the_difference_of_two_readings_over_its_wall_time():
    from bench.splitwise_vs_colocated import steps_during

    zero = {f"{p}_{w}": 0.0 for p in ("prefill", "decode") for w in ("steps", "s", "tokens")}
    before = {"token_worker-0": {**zero, "decode_steps": 10, "decode_s": 1.0, "decode_tokens": 10}}
    after = {"token_worker-0": {**zero, "decode_steps": 30, "decode_s": 3.0, "decode_tokens": 70},
             "prompt_worker-0": {**zero, "prefill_steps": 4, "prefill_s": 5.0, "prefill_tokens": 1000}}
    work = steps_during(before, after, wall_s=10.0)
    token, prompt = work["token_worker-0"], work["prompt_worker-0"]
    assert token["decode_busy"] == pytest.approx(0.2) and token["prefill_busy"] == 0
    assert token["decode_step_ms"] == pytest.approx(100.0) and token["decode_batch"] == pytest.approx(3.0)
    assert token["prefill_tok_s"] is None
    assert prompt["prefill_busy"] == pytest.approx(0.5) and prompt["prefill_tok_s"] == pytest.approx(200.0)
    assert prompt["decode_step_ms"] is None and prompt["decode_batch"] is None
