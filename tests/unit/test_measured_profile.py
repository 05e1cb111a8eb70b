"""`splitwise profile` and the measured profile it writes: CSV + sidecar in, a MachineProfile out."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from splitwise.sim.machines import MachineType, ModelSpec, resolve_profile
from splitwise.sim.measured import LOCAL_SHM_BYTES_PER_S, MeasuredMachine, measured_profile, sidecar_path
from splitwise.sim.perf_model import CSV_COLUMNS, load_profile, write_profile_rows
from splitwise.sim.profiler import plan

MEASURED = {  # (prompt_size, batch_size): (prompt_time ms, token_time ms)
    (16, 1): (2.0, 1.0), (64, 1): (5.0, 1.2), (16, 4): (4.0, 2.0), (64, 4): (14.0, 2.6),
}


def sidecar(**changes) -> MeasuredMachine:
    fields = dict(
        model="tiny-llama", hardware="cpu-1core", num_layers=4, num_kv_heads=2, head_dim=16, dtype="float32",
        dtype_bytes=4, weights_bytes=805888, max_context_tokens=1024, kv_memory_bytes=8 << 20,
        kv_capacity_tokens=8192, prompt_worker_kv_capacity_tokens=4096, block_size=16, max_batch_tokens=2048,
        max_decode_batch=256, num_threads=1, device="cpu", host="vm", cpu_count=2, platform="Linux", torch_version="2",
        repeats=5, measured_at="2026-01-01T00:00:00+00:00", link_bytes_per_s=2e9,
    )
    return MeasuredMachine(**{**fields, **changes})


def write_measured(path, machine: MeasuredMachine | None = None):
    rows = [{"model": "tiny-llama", "hardware": "cpu-1core", "prompt_size": p, "batch_size": b, "token_size": p,
             "prompt_time": prompt_ms, "token_time": token_ms, "tensor_parallel": 1}
            for (p, b), (prompt_ms, token_ms) in MEASURED.items()]
    write_profile_rows(path, rows)
    (machine or sidecar()).write(sidecar_path(path))
    return path


def test_measured_profile_interpolates_the_measured_points(tmp_path):
    profile = measured_profile(write_measured(tmp_path / "tiny.csv"))
    perf = profile.perf
    # Prefill over the batch's tokens (64 is measured twice: 64 x 1 and 16 x 4, whose median is kept).
    assert perf.prefill_s(16) == pytest.approx(0.002)
    assert perf.prefill_s(64) == pytest.approx((0.005 + 0.004) / 2)
    assert perf.prefill_s(256) == pytest.approx(0.014)
    assert perf.prefill_s(160) == pytest.approx((0.0045 + 0.014) / 2)
    # Decode over the batch's sequences (the median over the contexts measured).
    assert perf.decode_s(1) == pytest.approx(0.0011)
    assert perf.decode_s(4) == pytest.approx(0.0023)
    assert perf.decode_s(2) == pytest.approx(0.0011 + (0.0023 - 0.0011) / 3)


def test_measured_profile_machine_holds_the_sidecars_kv_capacity_at_no_cost(tmp_path):
    profile = measured_profile(write_measured(tmp_path / "tiny.csv"))
    assert profile.name == "tiny-llama@cpu-1core"
    assert profile.model == ModelSpec("tiny-llama", 4, 2, 16, 805888, 4)
    assert profile.model.kv_bytes_per_token == 1024
    assert profile.kv_capacity_tokens == 8192
    assert (profile.machine.cost_per_hour, profile.machine.power_kw) == (0, 0)
    assert profile.machine.link_bytes_per_s == 2e9


def test_measured_profile_without_a_link_takes_shared_memorys(tmp_path):
    profile = measured_profile(write_measured(tmp_path / "tiny.csv", sidecar(link_bytes_per_s=None)))
    assert profile.machine.link_bytes_per_s == LOCAL_SHM_BYTES_PER_S


def test_resolve_profile_reads_a_measured_csv_by_its_path(tmp_path):
    path = write_measured(tmp_path / "tiny.csv")
    assert resolve_profile(str(path)) == measured_profile(path)


def test_measured_profile_takes_a_given_machine_and_model_without_a_sidecar(tmp_path):
    path = write_measured(tmp_path / "tiny.csv")
    sidecar_path(path).unlink()
    machine = MachineType("vm", "cpu-1core", cost_per_hour=0.1, power_kw=0.2, gpus=1, gpu_memory_bytes=1e9)
    model = ModelSpec("tiny-llama", 4, 2, 16, 805888, 4)
    profile = measured_profile(path, machine, model)
    assert (profile.machine, profile.model) == (machine, model)
    assert profile.perf.prefill_s(16) == pytest.approx(0.002)


def test_measured_profile_of_a_missing_csv_says_how_to_make_one(tmp_path):
    with pytest.raises(ValueError, match="no such profile CSV.*splitwise profile"):
        measured_profile(tmp_path / "absent.csv")


def test_measured_profile_without_its_sidecar_says_it_is_missing(tmp_path):
    path = write_measured(tmp_path / "tiny.csv")
    sidecar_path(path).unlink()
    with pytest.raises(ValueError, match="sidecar is missing"):
        measured_profile(path)


def test_measured_profile_with_wrong_columns_names_the_missing_ones(tmp_path):
    path = tmp_path / "wrong.csv"
    path.write_text("model,hardware,prompt_size\ntiny-llama,cpu-1core,16\n")
    sidecar().write(sidecar_path(path))
    with pytest.raises(ValueError, match=r"not a performance profile; columns \['batch_size', 'prompt_time', 'token_time'\]"):
        measured_profile(path)


def test_measured_profile_with_a_broken_sidecar_names_the_missing_fields(tmp_path):
    path = write_measured(tmp_path / "tiny.csv")
    sidecar_path(path).write_text(json.dumps({"model": "tiny-llama"}))
    with pytest.raises(ValueError, match="not a profile sidecar; fields .*'kv_capacity_tokens'"):
        measured_profile(path)
    sidecar_path(path).write_text("{not json")
    with pytest.raises(ValueError, match="not a profile sidecar"):
        measured_profile(path)


def test_profile_plan_fits_the_context_window_and_kv_capacity():
    points = plan((16, 512, 2048), (1, 64), max_context_tokens=1024, kv_capacity_tokens=8192, decode_steps=5,
                  max_decode_batch=256)
    assert [(p.prompt_size, p.batch_size) for p in points] == [(16, 1), (512, 1), (1018, 1), (16, 64)]


def test_splitwise_profile_quick_writes_a_profile_the_simulator_reads(tmp_path, tiny_folder, cache_dir):
    out = tmp_path / "tiny-llama-cpu.csv"
    done = subprocess.run(
        [sys.executable, "-m", "splitwise.cli", "profile", "--model", "tiny-llama", "--cache-dir", str(cache_dir),
         "--device", "cpu", "--num-threads", "1", "--kv-memory-bytes", str(8 << 20), "--quick", "--repeats", "2",
         "--out", str(out)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "SPLITWISE_LOG_LEVEL": "WARNING"},
    )
    assert done.returncode == 0, done.stderr
    progress = [line for line in done.stderr.splitlines() if line.startswith("[")]
    assert len(progress) == 4  # one line per point: batches of 1 and 4 prompts of 16 and 64 tokens
    with out.open() as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert tuple(reader.fieldnames) == CSV_COLUMNS
    assert {(int(r["prompt_size"]), int(r["batch_size"])) for r in rows} == {(16, 1), (64, 1), (16, 4), (64, 4)}
    assert {(r["model"], r["hardware"], r["tensor_parallel"]) for r in rows} == {("tiny-llama", "cpu-1core", "1")}
    assert all(float(r["prompt_time"]) > 0 and float(r["token_time"]) > 0 for r in rows)
    assert load_profile(out).name == "tiny-llama@cpu-1core/tp1"

    profile = resolve_profile(str(out))
    machine = MeasuredMachine.read(sidecar_path(out))
    assert (machine.num_threads, machine.device, machine.block_size, machine.max_batch_tokens) == (1, "cpu", 16, 2048)
    assert len(machine.load_average) == 2  # the host's load before and after, to tell a quiet run
    assert profile.model == ModelSpec("tiny-llama", 4, 2, 16, machine.weights_bytes, 4)
    assert profile.kv_capacity_tokens == machine.kv_capacity_tokens == (8 << 20) // 1024


def test_the_shipped_tiny_llama_profile_is_a_measured_profile():
    path = Path(__file__).resolve().parents[2] / "bench" / "profiles" / "tiny-llama-cpu.csv"
    profile = resolve_profile(str(path))
    machine = MeasuredMachine.read(sidecar_path(path))
    assert profile.name == "tiny-llama@cpu-1core"
    assert (machine.num_threads, machine.device, machine.dtype) == (1, "cpu", "float32")
    assert profile.kv_capacity_tokens == machine.kv_capacity_tokens
    assert [x for x, _ in profile.perf.token_points] == [1, 2, 4, 8, 16, 32, 64]
    assert max(x for x, _ in profile.perf.prompt_points) >= machine.max_batch_tokens


def test_a_bad_worker_variable_fails_splitwise_profile_alone_not_the_other_commands(monkeypatch, capsys):
    from splitwise.cli import build_parser

    monkeypatch.setenv("SPLITWISE_KV_MEMORY_BYTES", "lots")
    parser = build_parser()  # `splitwise up` (whose workers report the variable themselves) still parses
    assert parser.parse_args(["status"]).command == "status"
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["profile", "--quick"])
    assert exit_info.value.code == 2 and "invalid int value: 'lots'" in capsys.readouterr().err
