"""Metrics on Ray's Prometheus endpoint: every metric the service exports shows up with its
labels, and the request counters equal what the client saw after a bounded load."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from cluster.control.metrics import GENERATION_METRICS, METRICS, exported_name
from cluster.placement import EMPTY, Placement
from tests.integration.support import (
    MARKS,
    LoadDriver,
    Served,
    hidden_states,
    run_on,
    scrape,
    serve_config,
    total,
    wait_until,
)

pytestmark = MARKS

MODEL = "it-metrics"
RANDOM = {"layers": 2, "experts": 4, "hidden": 32, "ffn": 48, "top_k": 2, "seed": 9}
@pytest.fixture(scope="module")
def served(deploy_served) -> Iterator[Served]:
    start, stop = deploy_served
    config = serve_config(MODEL, random=RANDOM, workers=2).with_overrides(**{
        "monitoring.interval_s": 0.25, "rebalance.window_s": 600.0, "rebalance.min_window_tokens": 10**9,
    })
    served = start(config)
    yield served
    stop(served)


def test_request_counters_equal_the_client_tally(served):
    good, bad = 7, 3
    for i in range(good):
        served.client.infer(MODEL, hidden_states(16 + i, RANDOM["hidden"], i), layer=i % 2, timeout_s=30)
    codes = []
    for i in range(bad):
        with pytest.raises(grpc.RpcError) as info:
            served.client.infer(MODEL, hidden_states(4, RANDOM["hidden"] + 1, i), layer=0, timeout_s=30)  # wrong width
        codes.append(info.value.code().name)
    with pytest.raises(grpc.RpcError) as info:
        served.client.infer("no-such-model", hidden_states(4, RANDOM["hidden"], 0), layer=0, timeout_s=30)
    assert codes == ["INVALID_ARGUMENT"] * bad and info.value.code() == grpc.StatusCode.NOT_FOUND
    tokens = sum(16 + i for i in range(good))
    requests = exported_name("requests") + "_total"

    def counted() -> bool:
        s = scrape()
        return (total(s, requests, model=MODEL, code="OK") == good
                and total(s, requests, model=MODEL, code="INVALID_ARGUMENT") == bad
                and total(s, requests, model="(unknown)", code="NOT_FOUND") >= 1
                and total(s, exported_name("tokens") + "_total", model=MODEL) == tokens
                and total(s, exported_name("request_latency_s") + "_count", model=MODEL) == good)

    wait_until(counted, 30, "the request counters to reach the client's tally", poll_s=0.5)


def test_every_metric_is_exported_with_its_labels(served, server_loop):
    for i in range(4):
        served.client.infer(MODEL, hidden_states(32, RANDOM["hidden"], 50 + i), layer=i % 2, timeout_s=30)
    run_on(server_loop, served.deployment.controller.apply(with_one_more_replica(served.deployment.placement)))
    # hot experts are exported by rank only for big models; this one has 8 logical experts.
    # Scaling and worker-fault counters appear once something happens (test_faults checks the latter).
    # Generation metrics come from models that generate text (test_generation checks them).
    # Skipped expert-tokens appear once a request skips (test_expert_skipping checks them).
    expected = {name for name in METRICS
                if not name.startswith(("hot_expert", "scale")) and name not in ("worker_events", "skipped_expert_tokens")
                and name not in GENERATION_METRICS}

    def present() -> set[str]:
        names = {n for n, labels, _ in scrape() if labels.get("model") == MODEL}
        return {name for name in expected if any(n.startswith(exported_name(name)) for n in names)}

    wait_until(lambda: present() == expected, 30, f"every metric of {sorted(expected)}", poll_s=0.5)
    samples = [(n, l) for n, l, _ in scrape() if l.get("model") == MODEL]
    for name in expected:
        labels = METRICS[name][2]
        found = [l for n, l in samples if n.startswith(exported_name(name))]
        assert all(set(labels) <= set(l) for l in found), (name, labels, found[:2])
    experts = {(l["layer"], l["expert"]) for n, l in samples if n == exported_name("expert_replicas")}
    assert experts == {(str(layer), str(e)) for layer in (0, 1) for e in range(RANDOM["experts"])}
    balance = {l["layer"] for n, l in samples if n == exported_name("balancedness")}
    assert balance == {"0", "1"}


def with_one_more_replica(placement: Placement) -> Placement:
    """`placement` plus a second replica of an expert worker 0 lacks, in a free slot (a move)."""
    rows = [list(row) for row in placement.slots]
    missing = next(e for e in range(placement.num_logical_experts) if e not in rows[0])
    rows[0][rows[0].index(EMPTY)] = missing
    return Placement.from_mapping(placement.version + 1, placement.num_logical_experts, rows)


def test_worker_gauges_follow_the_load(served):
    name = exported_name("worker_tokens_per_s")

    def busy() -> bool:
        return any(n == name and l.get("model") == MODEL and v > 0 for n, l, v in scrape())

    # the gauge is a rate between two looks: keep the load on while waiting for an export of it
    expected = lambda layer, x: served.expected(layer, x)[0]  # noqa: E731
    driver = LoadDriver(served.address, MODEL, served.spec, expected, threads=1, tokens=(32, 64)).start()
    try:
        wait_until(busy, 30, "a worker's tokens/s gauge above 0", poll_s=0.5)
    finally:
        tally = driver.stop()
    assert set(tally) == {"OK"}, tally
    states = {l["state"]: v for n, l, v in scrape() if n == exported_name("workers") and l.get("model") == MODEL}
    assert states == {"serving": 2.0, "pending": 0.0}
    assert np.isfinite(total(scrape(), exported_name("placement_version"), model=MODEL))
