"""End to end: `splitwise up` runs the services as separate OS processes on the real SmolLM2 model."""

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from splitwise.client import SplitwiseClient
from splitwise.launcher import free_port_ranges
from splitwise.model.weights import load_tokenizer, resolve_model
from tests.reference import hf_greedy
from tests.traces import SCHEDULER_GENERATE, tops, wait_for_whole_trace

pytestmark = pytest.mark.e2e

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain photosynthesis briefly.",
             "def fib(n):"]
MAX_TOKENS = 40


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, cache_dir):
    run_dir = tmp_path_factory.mktemp("run")
    names = ("port", "prompt-port", "token-port", "kv-store-port", "redis-port", "http-port")
    ports = dict(zip(names, free_port_ranges(*[1] * len(names))))
    args = [sys.executable, "-m", "splitwise.cli", "up", "--run-dir", str(run_dir), "--device", "cpu",
            "--metrics-port", "0"]
    for name, port in ports.items():
        args += [f"--{name}", str(port)]
    env = {**os.environ, "SPLITWISE_CACHE_DIR": str(cache_dir), "SPLITWISE_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("Ctrl-C stops everything"):
            break
    else:
        proc.kill()
    output = "".join(lines)
    if proc.poll() is not None or "cluster healthy" not in output:
        proc.kill()
        logs = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in (run_dir / "logs").glob("*.log"))
        pytest.fail(f"splitwise up did not come up:\n{output}\n{logs}")
    pids = [int(p) for p in re.findall(r"pid (\d+)", output)]
    metrics = dict(re.findall(r"^\s+(\S+)\s.*metrics http://(\S+)/metrics", output, re.M))
    yield {"address": f"127.0.0.1:{ports['port']}", "run_dir": run_dir, "pids": pids, "proc": proc, "metrics": metrics,
           "http": f"127.0.0.1:{ports['http-port']}", "output": output}
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is not alive
        return f.read().split(")")[-1].split()[0] != "Z"


async def test_concurrent_clients_get_transformers_greedy_output_from_smollm2(cluster, cache_dir):
    folder = resolve_model("smollm2-135m-instruct", cache_dir)[1]
    tokenizer = load_tokenizer(folder)
    async with SplitwiseClient(cluster["address"]) as client:
        outs = await asyncio.gather(*(
            client.generate(messages=[{"role": "user", "content": q}], max_tokens=MAX_TOKENS, timeout=300)
            for q in QUESTIONS
        ))
    for question, out in zip(QUESTIONS, outs):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False)
        assert out.token_ids == hf_greedy(folder, list(ids), MAX_TOKENS), question
    assert "Paris" in outs[0].text


async def test_one_request_is_one_whole_trace_across_the_scheduler_and_worker_processes(cluster):
    async with SplitwiseClient(cluster["address"]) as client:
        out = await client.generate(prompt="Hello", max_tokens=4, timeout=120)
    files = sorted((cluster["run_dir"] / "traces").glob("*.jsonl"))
    spans = await wait_for_whole_trace(files, out.request_id)
    for service in ("scheduler", "prompt_worker", "token_worker"):
        assert any(s["service"] == service and s["attributes"].get("splitwise.request_id") == out.request_id
                   for s in spans), f"{service} exported no span of request {out.request_id}"
    assert len({s["trace_id"] for s in spans}) == 1
    # The one span whose parent is outside the cluster's exports is the scheduler's (its parent, if any, is the
    # client's span in this test process).
    assert [(s["name"], s["kind"], s["service"]) for s in tops(spans)] == [(*SCHEDULER_GENERATE, "scheduler")]


async def test_the_openai_sdk_gets_transformers_greedy_output_through_the_http_gateway(cluster, cache_dir):
    folder = resolve_model("smollm2-135m-instruct", cache_dir)[1]
    tokenizer = load_tokenizer(folder)
    key = (cluster["run_dir"] / "api-key").read_text().strip()
    assert f"curl http://{cluster['http']}/v1/chat/completions" in cluster["output"]
    messages = [{"role": "user", "content": QUESTIONS[0]}]
    async with openai.AsyncOpenAI(base_url=f"http://{cluster['http']}/v1", api_key=key, max_retries=0,
                                  timeout=300) as client:
        out = await client.chat.completions.create(model="smollm2-135m-instruct", messages=messages,
                                                   max_tokens=MAX_TOKENS, temperature=0)
        stream = await client.chat.completions.create(model="smollm2-135m-instruct", messages=messages,
                                                      max_tokens=MAX_TOKENS, stream=True)
        streamed = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    expected = hf_greedy(folder, list(ids), MAX_TOKENS)
    assert out.choices[0].message.content == tokenizer.decode(expected, skip_special_tokens=True)
    assert streamed == out.choices[0].message.content and "Paris" in streamed
    assert out.usage.completion_tokens == len(expected)


async def test_an_http_request_is_one_trace_rooted_at_the_gateway(cluster):
    key = (cluster["run_dir"] / "api-key").read_text().strip()
    async with openai.AsyncOpenAI(base_url=f"http://{cluster['http']}/v1", api_key=key, max_retries=0,
                                  timeout=120) as client:
        out = await client.completions.create(model="smollm2-135m-instruct", prompt="Hello", max_tokens=4)
    request_id = out.id.removeprefix("cmpl-")
    files = sorted((cluster["run_dir"] / "traces").glob("*.jsonl"))
    spans = await wait_for_whole_trace(files, request_id)
    assert len({s["trace_id"] for s in spans}) == 1
    assert [(s["name"], s["kind"], s["service"]) for s in tops(spans)] == [
        ("POST /v1/completions", "SERVER", "gateway")]
    assert {"scheduler", "prompt_worker", "token_worker"} <= {s["service"] for s in spans}


def test_cli_generate_and_status_talk_to_the_cluster(cluster):
    cli = [sys.executable, "-m", "splitwise.cli"]
    generate = subprocess.run([*cli, "generate", "--address", cluster["address"], "What is the capital of France?"],
                              capture_output=True, text=True, timeout=120)
    assert generate.returncode == 0, generate.stderr
    assert "Paris" in generate.stdout
    assert "time to first token" in generate.stderr
    status = subprocess.run([*cli, "status", "--address", cluster["address"]], capture_output=True, text=True,
                            timeout=60)
    assert status.returncode == 0, status.stderr
    assert "prompt_worker-0" in status.stdout and "token_worker-0" in status.stdout
    assert "pools: prompt 1 workers" in status.stdout and "token 1 workers" in status.stdout


def scrape(address: str) -> dict:
    text = urllib.request.urlopen(f"http://{address}/metrics", timeout=10).read().decode()
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples if not s.labels
            or set(s.labels) <= {"otel_scope_name", "otel_scope_version", "otel_scope_schema_url"}}


async def test_every_process_serves_prometheus_metrics_and_ttft_counts_the_requests_sent(cluster):
    assert set(cluster["metrics"]) == {"kv_store", "prompt_worker-0", "token_worker-0", "scheduler", "gateway"}
    scheduler = cluster["metrics"]["scheduler"]
    count = "gen_ai_server_time_to_first_token_seconds_count"
    before = scrape(scheduler).get(count, 0)
    async with SplitwiseClient(cluster["address"]) as client:
        await asyncio.gather(*(client.generate(prompt=f"Count to {i}", max_tokens=3, timeout=120) for i in range(3)))
    assert scrape(scheduler)[count] - before == 3
    for name, address in cluster["metrics"].items():
        text = urllib.request.urlopen(f"http://{address}/metrics", timeout=10).read().decode()
        families = {f.name for f in text_string_to_metric_families(text)}
        expected = {"scheduler": "splitwise_requests", "kv_store": "splitwise_kv_store_stored_bytes",
                    "gateway": "splitwise_gateway_requests"}.get(name, "splitwise_kv_blocks")
        assert expected in families, (name, sorted(families))


def test_sigterm_stops_every_process(cluster):
    proc = cluster["proc"]
    assert all(alive(pid) for pid in cluster["pids"])
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in cluster["pids"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in cluster["pids"] if alive(pid)]
