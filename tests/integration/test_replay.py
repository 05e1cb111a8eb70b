"""The replay tool against a live cluster (tiny model): a short window of each Azure trace completes, open loop,
and the per-request CSV has one row per request with consistent timings."""

from pathlib import Path

import pytest

from splitwise.replay import cluster_model, load_trace, measure_idle_baseline, replay
from splitwise.slo import read_csv, slo_attainment, summarize, write_csv
from services.gateway import app as gateway_app
from splitwise.config import GatewayConfig
from tests import security
from tests.integration.cluster import local_cluster, wait_for_workers

TRACES = Path(__file__).resolve().parents[1] / "data" / "azure-llm-2023"
TINY_CONTEXT = 1024
TINY_VOCAB = 256


@pytest.fixture(scope="module")
async def cluster(redis_url, cache_dir, trace_file):
    isolated = redis_url.rsplit("/", 1)[0] + "/11"
    async with local_cluster(isolated, "tiny-llama", cache_dir) as c:
        await wait_for_workers(c)
        yield c


@pytest.fixture(scope="module")
async def gateway(cluster, cache_dir):
    server = await gateway_app.start(GatewayConfig(listen="127.0.0.1:0", schedulers=cluster.address,
                                                   model="tiny-llama", cache_dir=str(cache_dir),
                                                   api_key=security.API_KEY, admin_key=security.ADMIN_KEY))
    yield server
    await server.stop()


def test_a_trace_window_is_read_scaled_and_clipped_to_the_context():
    whole = load_trace(str(TRACES / "conv-head.csv"))
    assert len(whole) == 300 and whole[0].arrival_s == 0 and whole[0].prompt_tokens == 374
    assert all(a.arrival_s <= b.arrival_s for a, b in zip(whole, whole[1:]))
    window = load_trace(str(TRACES / "conv-head.csv"), start_s=10, duration_s=20)
    assert window[0].arrival_s == 0 and window[-1].arrival_s < 20 and 0 < len(window) < len(whole)
    fast = load_trace(str(TRACES / "conv-head.csv"), rate_scale=4, length_scale=8, max_requests=10,
                      max_context_tokens=TINY_CONTEXT)
    assert len(fast) == 10
    assert fast[-1].arrival_s == pytest.approx(whole[9].arrival_s / 4)
    assert fast[0].prompt_tokens == round(374 / 8) and fast[0].output_tokens == round(44 / 8)
    clipped = load_trace(str(TRACES / "code-head.csv"), max_context_tokens=TINY_CONTEXT)
    assert all(r.prompt_tokens + r.output_tokens <= TINY_CONTEXT for r in clipped)


@pytest.mark.parametrize("trace, api", [("conv", "grpc"), ("code", "grpc"), ("conv", "openai")])
async def test_a_short_window_of_each_trace_completes_with_one_consistent_row_per_request(cluster, gateway, tmp_path,
                                                                                         trace, api):
    requests = load_trace(str(TRACES / f"{trace}-head.csv"), rate_scale=8, length_scale=8, max_requests=16,
                          max_context_tokens=TINY_CONTEXT)
    address = gateway.address if api == "openai" else cluster.address
    model, vocab, _ = await cluster_model(address, api)
    assert model == "tiny-llama" and vocab >= TINY_VOCAB
    results = await replay(address, requests, TINY_VOCAB, seed=1, progress=False, api=api, model=model)
    assert [r.error for r in results] == [""] * len(requests)
    write_csv(results, tmp_path / "requests.csv")
    rows = read_csv(tmp_path / "requests.csv")
    assert len(rows) == len(requests) == len({r.request_id for r in rows})
    for request, row in zip(requests, rows):
        assert row.arrival_s == pytest.approx(request.arrival_s)
        assert (row.prompt_tokens, row.output_tokens) == (request.prompt_tokens, request.output_tokens)
        assert 0 < row.ttft_s <= row.e2e_s
        if request.output_tokens > 1:
            assert 0 <= row.tbt_mean_s <= row.tbt_max_s <= row.e2e_s - row.ttft_s + 1e-6
    for result in results:
        assert len(result.tbt_s) == result.output_tokens - 1
        assert result.ttft_s + sum(result.tbt_s) <= result.e2e_s + 1e-6
    summary = summarize(results)
    assert summary["ok"] == len(requests) and summary["failed"] == 0


async def test_the_idle_baseline_is_measured_by_the_tool_and_gives_an_slo_report(cluster):
    baseline = await measure_idle_baseline(cluster.address, TINY_VOCAB, TINY_CONTEXT, prompt_lengths=[16, 256],
                                           output_tokens=8, repeats=1)
    assert baseline.ttft(16) > 0 and baseline.tbt(20) > 0
    requests = load_trace(str(TRACES / "conv-head.csv"), rate_scale=8, length_scale=8, max_requests=6,
                          max_context_tokens=TINY_CONTEXT)
    results = await replay(cluster.address, requests, TINY_VOCAB, progress=False)
    report = slo_attainment(results, baseline)
    assert len(report.checks) == 9
