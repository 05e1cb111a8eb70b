"""`splitwise sim` and `splitwise plan` as a user runs them: a table and files out, clear errors for bad input."""

import csv
import json

import pytest

from splitwise.cli import main
from splitwise.sim.plan import Evaluated, SLOSpec, Workload, a100_baseline, max_rate, pareto
from splitwise.sim.designs import parse_design
from splitwise.sim.simulator import SimConfig
from splitwise.sim.workload import trace_lengths


def run(capsys, *argv) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def test_sim_prints_each_designs_cost_power_slos_and_writes_per_request_files(capsys, tmp_path):
    code, out, _ = run(capsys, "sim", "--design", "splitwise:3*dgx-h100+2*dgx-a100", "--design", "baseline:4*dgx-a100",
                       "--trace", "code", "--rate", "4", "--duration", "10", "--out", str(tmp_path))
    assert code == 0
    assert "== splitwise:3*dgx-h100+2*dgx-a100: 5 machines, $149/h, 44 kW provisioned" in out
    assert "== baseline:4*dgx-a100: 4 machines, $70/h, 26 kW provisioned" in out
    assert out.count("| P99 TBT |") == 2 and "events/s" in out
    summary = json.loads((tmp_path / "splitwise-3xdgx-h100_2xdgx-a100.json").read_text())
    with open(tmp_path / "splitwise-3xdgx-h100_2xdgx-a100.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == summary["summary"]["requests"] > 0
    assert all(float(r["ttft_s"]) > 0 for r in rows)


def test_sim_refuses_a_design_it_cannot_read_naming_the_syntax(capsys):
    code, _, err = run(capsys, "sim", "--design", "splitwise:3*dgx-h100", "--rate", "1")
    assert code == 2 and "splitwise:P*MACHINE+T*MACHINE" in err
    code, _, err = run(capsys, "sim", "--design", "baseline:3*dgx-b200", "--rate", "1")
    assert code == 2 and "dgx-a100" in err


def test_plan_within_a_power_budget_prints_a_table_and_writes_designs_requests_and_plots(capsys, tmp_path):
    code, out, err = run(capsys, "plan", "--power-budget", "40", "--families", "Baseline-A100,Splitwise-HA",
                         "--trace", "code", "--duration", "8", "--out", str(tmp_path))
    assert code == 0, err
    assert "most throughput meeting the SLOs within 40 kW" in out
    assert "Baseline-A100" in out and "Splitwise-HA" in out and "Pareto front" in out
    with open(tmp_path / "designs.csv") as f:
        designs = list(csv.DictReader(f))
    assert {d["family"] for d in designs} == {"Baseline-A100", "Splitwise-HA"}
    assert all(float(d["power_kw"]) <= 40 for d in designs)
    assert (tmp_path / "throughput-vs-cost-and-power.png").stat().st_size > 10_000
    assert list(tmp_path.glob("requests-*.csv"))


def test_plan_refuses_unknown_families_and_scales(capsys):
    code, _, err = run(capsys, "plan", "--cost-budget", "100", "--families", "Splitwise-ZZ")
    assert code == 2 and "Splitwise-AA" in err
    code, _, err = run(capsys, "plan", "--cost-budget", "100", "--scale", "2")
    assert code == 2 and "--scale" in err


def test_a_designs_throughput_is_the_highest_rate_meeting_the_slos_and_more_machines_serve_more():
    workload = Workload(trace_lengths("code"), duration_s=10)
    slos = SLOSpec(a100_baseline())
    config = SimConfig.live_defaults()
    small = max_rate(parse_design("baseline:2*dgx-h100"), workload, config, slos, iterations=5)
    large = max_rate(parse_design("baseline:6*dgx-h100"), workload, config, slos, iterations=5)
    assert 0 < small.throughput_rps < large.throughput_rps
    assert slos.met(small.result)


def test_the_pareto_front_keeps_only_designs_no_cheaper_one_beats():
    a, b, c = (parse_design(d) for d in ("baseline:2*dgx-a100", "baseline:3*dgx-a100", "baseline:4*dgx-a100"))
    points = [Evaluated("x", a, 1, 10.0, None), Evaluated("x", b, 1, 9.0, None), Evaluated("x", c, 1, 30.0, None)]
    assert [e.design for e in pareto(points, lambda e: e.cost_per_hour)] == [a, c]
