"""The control plane's metrics keep their label sets bounded: per (layer, expert) for small
models, the hottest experts by rank beyond `expert_series`. Recorded into fakes (no Ray)."""

import numpy as np
import pytest

from cluster.control.metrics import METRICS, ControlMetrics


class FakeGauge:
    def __init__(self):
        self.values: dict[tuple, float] = {}

    def set(self, value, tags):
        self.values[tuple(sorted(tags.items()))] = value


def recorded(layers, experts, expert_series, top_n=3) -> dict[str, FakeGauge]:
    metrics = ControlMetrics("m", layers, experts, expert_series=expert_series, top_n=top_n)
    metrics._gauges = {name: FakeGauge() for name in metrics._gauges}
    n = len(layers) * experts
    load = np.arange(n, dtype=np.float64).reshape(len(layers), experts)  # the last expert is hottest
    metrics.load(load, np.ones(n, dtype=np.int64), np.full(len(layers), 0.9), version=4)
    return metrics._gauges


def test_small_models_export_every_expert():
    gauges = recorded([0, 1], 4, expert_series=8)
    assert len(gauges["expert_tokens_per_s"].values) == 8
    assert gauges["expert_tokens_per_s"].values[(("expert", "3"), ("layer", "1"), ("model", "m"))] == 7.0
    assert not gauges["hot_expert_tokens_per_s"].values


@pytest.mark.parametrize("experts", [pytest.param(64, id="64"), pytest.param(4096, id="4096")])
def test_big_models_export_the_hottest_by_rank_only(experts):
    gauges = recorded([0, 1], experts, expert_series=8, top_n=3)
    assert not gauges["expert_tokens_per_s"].values
    ids = {dict(k)["rank"]: v for k, v in gauges["hot_expert_id"].values.items()}
    assert ids == {"0": 2 * experts - 1, "1": 2 * experts - 2, "2": 2 * experts - 3}
    assert len(gauges["hot_expert_tokens_per_s"].values) == 3  # the same 3 series whatever the size


def test_no_metric_has_a_per_request_label():
    for name, (_, _, labels) in METRICS.items():
        assert not {"request", "id", "request_id", "client"} & set(labels), name


def test_a_removed_workers_series_drop_to_zero():
    metrics = ControlMetrics("m", [0], 4)
    metrics._gauges = {name: FakeGauge() for name in metrics._gauges}
    rates = [{"index": i, "tokens_per_s": 10.0, "busy_fraction": 0.5, "outstanding_tokens": 3} for i in range(3)]
    metrics.workers(3, 0, rates)
    metrics.workers(2, 0, rates[:2])
    busy = {dict(k)["worker"]: v for k, v in metrics._gauges["worker_busy_fraction"].values.items()}
    assert busy == {"0": 0.5, "1": 0.5, "2": 0.0}
