"""The trace-replay simulator: golden cost-model arithmetic on hand-made traces, billing, the
autoscaled run against static provisioning, make-before-break scale-in, the plot and the CLI."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
from matplotlib import image
from rich.console import Console

from cluster.app.simulate_cli import add_simulate_parser, cmd_simulate, sim_config
from cluster.config import validate_config
from cluster.sim.compare import compare
from cluster.sim.report import summary_table, write_png
from cluster.sim.simulator import CostModel, simulate
from cluster.sim.traces import LoadTrace

COST = CostModel(capacity_tokens_per_s=1000.0, base_ms=25.0, slo_ms=100.0, move_s=1.0, startup_s=300.0)
DAY_COST = CostModel()  # 30,000 expert-tokens/s per worker, for the built-in config's 20,000 target


def fixed_config(count: int, slots: int, rebalance: bool = False, **autoscaling) -> object:
    """`count` workers of `slots` slots; autoscaling only when given settings."""
    return validate_config({
        "workers": {"count": count, "min_workers": 1, "max_workers": 8, "slots_per_worker": slots},
        "rebalance": {"enabled": rebalance, "min_window_tokens": 0},
        "autoscaling": {"enabled": bool(autoscaling), **autoscaling},
    })


def constant(load: list[list[float]], steps: int, step_s: float = 300.0) -> LoadTrace:
    return LoadTrace(step_s, np.repeat(np.array(load, dtype=float)[None], steps, axis=0))


@pytest.fixture(scope="module")
def day() -> tuple[LoadTrace, object]:
    """A small diurnal day (2 layers x 8 experts, 2..12 workers) and the built-in sim config."""
    config = sim_config(2, 12, layers=2, experts=8, cost=DAY_COST)
    peak = 0.7 * 12 * config.autoscaling.target_tokens_per_s_per_worker / (2 * 2)
    trace = LoadTrace.diurnal(2, 8, 2, 1.0, 900.0, peak, 0.25, 1.0, 0.5, seed=1, bursts_per_day=0.0)
    start = int(np.ceil(trace.total_tokens_per_s[0] / config.autoscaling.target_tokens_per_s_per_worker))
    return trace, config.with_overrides(**{"workers.count": start})


# ---- golden arithmetic ---------------------------------------------------------------------


@pytest.mark.parametrize("workers", [pytest.param(1, id="one"), pytest.param(2, id="two"), pytest.param(4, id="four")])
def test_constant_load_bills_workers_times_hours(workers):
    run = simulate(constant([[100.0, 100.0]], steps=36), fixed_config(workers, 2), COST, workers=workers)
    assert run.gpu_hours == pytest.approx(workers * 3.0)  # 36 steps x 300 s = 3 hours
    assert run.slo_attainment == 1.0 and not run.gave_up


@pytest.mark.parametrize(("load", "rho", "latency_ms"), [
    # 2 workers, one slot each: one expert per worker; the busier one sets rho = load / 1000
    pytest.param([600.0, 400.0], 0.6, 25 / 0.4, id="rho-0.6-meets"),
    pytest.param([700.0, 300.0], 0.7, 25 / 0.3, id="rho-0.7-meets"),
    pytest.param([800.0, 200.0], 0.8, 25 / 0.2, id="rho-0.8-misses"),
    pytest.param([1200.0, 100.0], 1.2, np.inf, id="rho-above-1-unbounded"),
])
def test_latency_grows_with_the_busiest_workers_utilisation(load, rho, latency_ms):
    run = simulate(constant([load], steps=2), fixed_config(2, 1), COST, workers=2)
    assert run.utilisation == pytest.approx([rho, rho])
    assert run.latency_ms == pytest.approx([latency_ms] * 2)
    assert run.slo_met.tolist() == [latency_ms <= 100.0] * 2


def test_slo_attainment_is_token_weighted():
    # step 0 at rho 0.3 meets, step 1 carries 3x the tokens at rho 0.9 and misses: 1 / (1 + 3)
    trace = LoadTrace(300.0, np.array([[[300.0, 100.0]], [[900.0, 300.0]]]))
    run = simulate(trace, fixed_config(2, 1), COST, workers=2)
    assert run.slo_met.tolist() == [True, False]
    assert run.slo_attainment == pytest.approx(0.25)


def test_replica_loads_cost_the_target_workers_capacity_in_their_step():
    # expert 0 hot, then expert 1: the controller replicates the new hot expert in step 2
    hot0, hot1 = [[600.0, 50.0, 50.0, 50.0]], [[50.0, 600.0, 50.0, 50.0]]
    trace = LoadTrace(10.0, np.array([hot0, hot0, hot1, hot1]))
    run = simulate(trace, fixed_config(3, 3, rebalance=True), COST.model_copy(update={"move_s": 2.0}), workers=3)
    assert run.moves[2] > 0 and run.moves[3] == 0
    assert run.utilisation[2] > run.utilisation[3]  # same load and placement, less capacity while loading
    assert [e.kind for e in run.events] == ["rebalance"]


def test_a_pending_worker_is_billed_from_the_ask_and_serves_after_startup():
    # 1500 tok/s on 1 worker > target 1000: the wish holds 60 s, so at t=60 one worker is asked
    # for; it is ready at 360 s and joins at the next step start (600 s)
    config = fixed_config(1, 2, max_step=1, target_tokens_per_s_per_worker=1000.0, upscale_delay_s=60.0,
                          downscale_delay_s=3600.0, max_queue_delay_ms=1000.0)
    run = simulate(constant([[750.0, 750.0]], steps=4), config, COST.model_copy(update={"capacity_tokens_per_s": 2000.0}))
    assert run.billed.tolist() == pytest.approx([1 + 240 / 300, 2, 2, 2])
    assert run.serving.tolist() == [1, 1, 2, 2]
    assert run.pending.tolist() == [1, 1, 0, 0]
    assert [(e.kind, e.at_s) for e in run.events] == [("out", 60.0), ("join", 600.0)]


def test_runs_are_deterministic(day):
    trace, config = day
    a, b = simulate(trace, config, DAY_COST), simulate(trace, config, DAY_COST)
    assert np.array_equal(a.billed, b.billed) and np.array_equal(a.moves, b.moves)
    assert [e.detail for e in a.events] == [e.detail for e in b.events]


# ---- the autoscaler against static provisioning ----------------------------------------------


def test_autoscaling_uses_fewer_gpu_hours_than_static_peak_at_equal_slo(day):
    trace, config = day
    result = compare(trace, config, DAY_COST)
    auto, static, rule = result.autoscaled, result.static, result.rule
    assert auto.serving.min() < auto.serving.max()  # it did scale
    assert result.static_reached and static.slo_attainment >= auto.slo_attainment
    assert auto.gpu_hours < static.gpu_hours <= rule.gpu_hours
    assert result.gpu_hours_saved > 0.1  # 15% on this small, coarse fleet; the bench measures 64-1024
    assert auto.slo_attainment > 0.95  # misses: steps that wait for a worker to start
    # the search found the fewest: one worker fewer falls short
    fewer = simulate(trace, config, DAY_COST, workers=result.static_workers - 1)
    assert fewer.slo_attainment < auto.slo_attainment


def test_scale_in_moves_replicas_away_before_workers_go(day):
    trace, config = day
    run = simulate(trace, config, DAY_COST, keep_placements=True)
    scale_ins = [i for i, p in enumerate(run.placements) if p.num_workers > run.serving[i]]
    assert scale_ins, "the day should scale in at least once"
    for i, placement in enumerate(run.placements):
        assert placement.replica_counts.min() >= 1  # every logical expert has a replica, every step
        kept = int(run.serving[i])
        assert all(not placement.experts_of(w) for w in range(kept, placement.num_workers))
    for i in scale_ins:
        before = run.placements[i - 1]
        leaving = range(int(run.serving[i]), run.placements[i].num_workers)
        assert any(before.experts_of(w) for w in leaving)  # they held replicas until this step
        assert run.moves[i] > 0  # ... which moved onto the workers that stay


def test_static_runs_never_scale(day):
    trace, config = day
    run = simulate(trace, config, DAY_COST, workers=5)
    assert set(run.serving.tolist()) == {5} and not any(e.kind in ("out", "in", "join") for e in run.events)


def test_a_model_that_does_not_fit_min_workers_is_refused():
    config = validate_config({"workers": {"count": 2, "min_workers": 1, "max_workers": 4, "slots_per_worker": 1},
                              "autoscaling": {"enabled": True}})
    with pytest.raises(ValueError, match=r"cannot hold 1 layers x 3 experts"):
        simulate(constant([[1.0, 1.0, 1.0]], steps=1), config, COST)


def test_an_slo_below_the_idle_latency_is_refused():
    with pytest.raises(ValueError, match=r"slo_ms \(20.0\) must exceed base_ms \(25.0\)"):
        CostModel(base_ms=25.0, slo_ms=20.0)


# ---- the picture, the table and the CLI ------------------------------------------------------


def test_the_plot_is_a_png_of_the_asked_size(day, tmp_path):
    trace, config = day
    result = compare(LoadTrace(trace.step_s, trace.tokens_per_s[:24]), config, DAY_COST)
    path = tmp_path / "sim.png"
    write_png(result, path, DAY_COST.slo_ms, dpi=40)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert image.imread(path).shape[:2] == (10 * 40, 11 * 40)
    assert summary_table(result).row_count == 8


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="moe-serve")
    add_simulate_parser(parser.add_subparsers(dest="command", required=True))
    return cmd_simulate(parser.parse_args(["simulate", *argv]), Console())


TINY = ["--layers", "2", "--experts", "8", "--top-k", "2", "--days", "0.25", "--step-s", "900"]


def test_cli_runs_end_to_end_writing_json_and_png(tmp_path, capsys):
    png = tmp_path / "sim.png"
    assert run_cli([*TINY, "--min-workers", "2", "--max-workers", "8", "--json", "--png", str(png)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["settings"]["workers"]["min"] == 2 and report["settings"]["steps"] == 24
    assert {"autoscaled", "static", "static_peak_rule", "gpu_hours_saved"} <= set(report)
    assert report["autoscaled"]["gpu_hours"] > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_replays_a_recorded_trace_with_a_deployment_yaml(tmp_path, capsys):
    yaml_path, trace_path = tmp_path / "deploy.yaml", tmp_path / "trace.jsonl"
    yaml_path.write_text("workers: {count: 2, min_workers: 2, max_workers: 6, slots_per_worker: 8}\n"
                         "autoscaling: {enabled: true, target_tokens_per_s_per_worker: 20000}\n")
    LoadTrace.diurnal(2, 4, 2, 0.25, 900.0, 30000.0, seed=2).to_jsonl(trace_path)
    assert run_cli([str(yaml_path), "--trace", str(trace_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["settings"]["trace"] == str(trace_path)
    assert (report["settings"]["layers"], report["settings"]["experts"]) == (2, 4)
    assert report["settings"]["workers"]["max"] == 6


def test_cli_refuses_a_yaml_without_a_range_to_scale_within(tmp_path):
    yaml_path = tmp_path / "fixed.yaml"
    yaml_path.write_text("workers: {count: 2}\n")
    with pytest.raises(ValueError, match="needs a range of workers"):
        run_cli([str(yaml_path), *TINY])
