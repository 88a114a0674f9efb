"""Load traces: the diurnal trace's shape, drift and seeding; recorded traces read back, resampled,
and every bad-file mistake named with its file and line."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from cluster.sim.traces import LoadTrace, append_jsonl, record_line

SMOOTH = dict(noise_std=0.0, bursts_per_day=0.0)  # the bare daily curve


def diurnal(**kw) -> LoadTrace:
    args = dict(layers=2, experts=16, top_k=2, days=1.0, step_s=600.0, peak_tokens_per_s=1000.0,
                trough_ratio=0.25, zipf_s=1.0, drift_experts_per_hour=0.5, seed=3)
    return LoadTrace.diurnal(**{**args, **kw})


def hot_set(trace: LoadTrace, step: int, layer: int = 0, size: int = 2) -> set[int]:
    return set(np.argsort(-trace.tokens_per_s[step, layer], kind="stable")[:size].tolist())


# ---- the diurnal trace ---------------------------------------------------------------------


@pytest.mark.parametrize("trough", [pytest.param(0.25, id="trough-quarter"), pytest.param(0.5, id="trough-half"),
                                    pytest.param(1.0, id="flat")])
def test_daily_curve_peaks_at_16h_and_bottoms_at_04h(trough):
    trace = diurnal(trough_ratio=trough, **SMOOTH)
    total = trace.total_tokens_per_s
    # 1000 tokens/s at the peak x top_k 2 x 2 layers = 4000 expert-tokens/s; 16:00 and 04:00 are on the grid
    assert total.max() == pytest.approx(4000.0)
    assert total.min() == pytest.approx(4000.0 * trough)
    if trough < 1:
        assert trace.times_s[total.argmax()] / 3600 == pytest.approx(16.0)
        assert trace.times_s[total.argmin()] / 3600 == pytest.approx(4.0)


def test_noise_and_bursts_keep_the_peak_to_trough_ratio_near_four():
    total = diurnal(days=2, step_s=300.0).total_tokens_per_s
    ratio = total.max() / total.min()
    # 4 from the curve, x1.25 in a burst, x exp(+-3 sigma of 3%) noise
    assert 4.0 < ratio < 4 * 1.25 * math.exp(6 * 0.03)


def test_a_burst_lifts_the_load_for_its_duration():
    smooth = diurnal(step_s=300.0, **SMOOTH).total_tokens_per_s
    burst = diurnal(step_s=300.0, noise_std=0.0, bursts_per_day=1.0, burst_ratio=0.25, burst_s=1200.0).total_tokens_per_s
    lifted = np.isclose(burst / smooth, 1.25)
    assert lifted.sum() == 4  # 1200 s of 300 s steps
    assert np.isclose(burst[~lifted], smooth[~lifted]).all()


def test_every_layer_routes_top_k_picks_per_token_and_no_expert_more_than_one():
    trace = diurnal(zipf_s=2.0, **SMOOTH)  # s=2: the hottest expert wants more than one pick per token
    tokens = trace.total_tokens_per_s / (2 * 2)  # [steps] model tokens/s
    per_layer = trace.tokens_per_s.sum(axis=2)  # [steps, layers]
    assert np.allclose(per_layer, 2 * tokens[:, None])
    assert (trace.tokens_per_s <= tokens[:, None, None] * (1 + 1e-9)).all()
    assert np.isclose(trace.tokens_per_s.max(axis=2), tokens[:, None]).all()  # capped: exactly one pick


def test_the_hot_set_drifts_over_the_day_and_stays_without_drift():
    drifting, still = diurnal(drift_experts_per_hour=1.0), diurnal(drift_experts_per_hour=0.0)
    last = drifting.steps - 1
    assert hot_set(drifting, 0) != hot_set(drifting, last)
    assert all(hot_set(still, 0, layer) == hot_set(still, last, layer) for layer in range(2))


def test_seeded_traces_are_reproducible():
    assert np.array_equal(diurnal(seed=7).tokens_per_s, diurnal(seed=7).tokens_per_s)
    assert not np.array_equal(diurnal(seed=7).tokens_per_s, diurnal(seed=8).tokens_per_s)


def test_steps_cover_the_days():
    trace = diurnal(days=1.5, step_s=700.0)
    assert (trace.steps, trace.layers, trace.experts) == (math.ceil(1.5 * 86400 / 700), 2, 16)


@pytest.mark.parametrize(("kw", "message"), [
    pytest.param({"top_k": 17}, "top_k must be in 1..experts", id="top-k-above-experts"),
    pytest.param({"trough_ratio": 1.5}, "trough_ratio", id="trough-above-one"),
    pytest.param({"step_s": 0.0}, "step_s", id="zero-step"),
    pytest.param({"drift_experts_per_hour": -1.0}, "drift_experts_per_hour", id="negative-drift"),
])
def test_bad_diurnal_arguments_are_named(kw, message):
    with pytest.raises(ValueError, match=message):
        diurnal(**kw)


@pytest.mark.parametrize(("step_s", "load", "message"), [
    pytest.param(0.0, np.ones((1, 1, 1)), "step_s", id="zero-step"),
    pytest.param(1.0, np.ones((2, 2)), r"\[steps, layers, experts\]", id="two-dimensional"),
    pytest.param(1.0, -np.ones((1, 1, 1)), ">= 0", id="negative"),
    pytest.param(1.0, np.full((1, 1, 1), np.inf), "finite", id="infinite"),
])
def test_a_trace_checks_itself(step_s, load, message):
    with pytest.raises(ValueError, match=message):
        LoadTrace(step_s, load)


# ---- recorded traces -----------------------------------------------------------------------


def test_round_trip_through_jsonl(tmp_path):
    trace = diurnal()
    trace.to_jsonl(tmp_path / "t.jsonl")
    back = LoadTrace.from_jsonl(tmp_path / "t.jsonl")
    assert back.step_s == trace.step_s
    assert np.allclose(back.tokens_per_s, trace.tokens_per_s, rtol=1e-12)


def test_resampling_to_a_coarser_step_averages_and_keeps_the_tokens(tmp_path):
    trace = diurnal()
    trace.to_jsonl(tmp_path / "t.jsonl")
    coarse = LoadTrace.from_jsonl(tmp_path / "t.jsonl", step_s=1200.0)
    pairs = trace.tokens_per_s.reshape(trace.steps // 2, 2, 2, 16).mean(axis=1)
    assert np.allclose(coarse.tokens_per_s, pairs)


def test_irregular_records_are_held_until_the_next_and_averaged_per_step(tmp_path):
    # rates 1, 3, 5 from t = 0, 10, 30; median gap 15 s, so the last holds 30..45
    path = tmp_path / "irregular.jsonl"
    for t_s, rate in ((0, 1.0), (10, 3.0), (30, 5.0)):
        append_jsonl(path, t_s, np.full((1, 2), rate))
    trace = LoadTrace.from_jsonl(path, step_s=15.0)
    # [0, 15): 10 s at 1 + 5 s at 3 = 25 tokens -> 25/15; [15, 30): 3; [30, 45): 5
    assert np.allclose(trace.tokens_per_s[:, 0, 0], [25 / 15, 3.0, 5.0])


def test_load_json_reports_record_and_read_back(tmp_path):
    # what `moe-serve load --json` prints: flat tokens_per_s beside layers and num_experts, and more
    report = {"model": "moe", "layers": [0, 3], "num_experts": 3, "window_s": 5.0,
              "tokens_per_s": [1, 2, 3, 4, 5, 6], "workers": [], "recent_events": []}
    path = tmp_path / "recorded.jsonl"
    append_jsonl(path, 0.0, report)
    append_jsonl(path, 60.0, {**report, "tokens_per_s": [6, 5, 4, 3, 2, 1]})
    assert json.loads(record_line(report, 1.0)) == {"t_s": 1.0, "tokens_per_s": [1, 2, 3, 4, 5, 6],
                                                    "layers": [0, 3], "num_experts": 3}
    trace = LoadTrace.from_jsonl(path)
    assert trace.step_s == 60.0
    assert trace.tokens_per_s.tolist() == [[[1, 2, 3], [4, 5, 6]], [[6, 5, 4], [3, 2, 1]]]


GOOD = '{"t_s": 0, "tokens_per_s": [[1, 2], [3, 4]]}'


@pytest.mark.parametrize(("lines", "line", "message"), [
    pytest.param([GOOD, "{oops"], 2, "not JSON", id="not-json"),
    pytest.param(["[1, 2]"], 1, "expected a JSON object", id="not-an-object"),
    pytest.param(['{"tokens_per_s": [[1]]}'], 1, "missing key 't_s'", id="missing-t_s"),
    pytest.param(['{"t_s": 0}'], 1, "missing key 'tokens_per_s'", id="missing-tokens"),
    pytest.param(['{"t_s": "soon", "tokens_per_s": [[1]]}'], 1, "t_s must be a finite number", id="t_s-not-a-number"),
    pytest.param([GOOD, '{"t_s": 1, "tokens_per_s": [[1, 2, 3]]}'], 2, r"shape \(1, 3\), the first line \(2, 2\)", id="shape-changes"),
    pytest.param(['{"t_s": 0, "tokens_per_s": [[[1]]]}'], 1, r"\[layers\]\[experts\]", id="three-dimensional"),
    pytest.param(['{"t_s": 0, "tokens_per_s": [[1, 2], [3]]}'], 1, "must be numbers", id="ragged"),
    pytest.param(['{"t_s": 0, "tokens_per_s": [1, 2]}'], 1, "needs 'layers'", id="flat-without-layers"),
    pytest.param(['{"t_s": 0, "tokens_per_s": [1, 2, 3], "layers": [0], "num_experts": 2}'], 1,
                 "has 3 values, but 1 layers x 2 experts need 2", id="flat-wrong-size"),
    pytest.param([GOOD, '{"t_s": 1, "tokens_per_s": [[1, -2], [3, 4]]}'], 2, "finite and >= 0", id="negative"),
    pytest.param(['{"t_s": 0, "tokens_per_s": [[1, NaN], [3, 4]]}'], 1, "finite and >= 0", id="nan"),
    pytest.param([GOOD, GOOD.replace('"t_s": 0', '"t_s": 0.0')], 2, "not after the previous line's 0", id="time-repeats"),
])
def test_bad_lines_are_named_with_file_and_line(tmp_path, lines, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=message) as err:
        LoadTrace.from_jsonl(path)
    assert f"{path}:{line}:" in str(err.value)


@pytest.mark.parametrize(("content", "message"), [
    pytest.param(None, "cannot read trace file", id="missing-file"),
    pytest.param(b"\n\n", "no records", id="empty"),
    pytest.param(b"\xff\xfe\x00", "not a text file", id="binary"),
])
def test_bad_files_are_named(tmp_path, content, message):
    path = tmp_path / "trace.jsonl"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as err:
        LoadTrace.from_jsonl(path)
    assert str(path) in str(err.value)
