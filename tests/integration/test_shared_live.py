"""Shared experts in a live service (a DeepSeek-V3 checkpoint): they are placed like routed
experts, the rebalancer gives them replicas because every token goes through them (their load
never shows as routed load), and moving them while serving loses no request and changes no
answer."""

from __future__ import annotations

import time

import numpy as np
import pytest

from cluster.app.console import placement_table
from tests.integration.support import MARKS, LoadDriver, run_on, serve_config
from workers.tiny_models import BY_NAME

pytestmark = MARKS
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def deepseek(deploy_served, tmp_path_factory):
    path = tmp_path_factory.mktemp("deepseek-v3-live")
    BY_NAME["deepseek-v3"].save(path)
    start, stop = deploy_served
    served = start(serve_config("it-shared-live", checkpoint=str(path), workers=3))
    yield served
    stop(served)


def test_shared_experts_are_replicated_and_moved_live(deepseek, server_loop):
    spec = deepseek.spec
    shared = [m * spec.experts_per_layer + spec.num_experts + s
              for m in range(spec.num_moe_layers) for s in range(spec.num_shared_experts)]
    controller = deepseek.deployment.controller
    before = deepseek.deployment.placement
    assert (before.replica_counts[shared] == 1).all()  # round robin: one replica each, like every expert

    driver = LoadDriver(deepseek.address, deepseek.name, spec, lambda layer, x: deepseek.expected(layer, x)[0],
                        threads=3).start()
    try:
        time.sleep(2.0)
        snapshot = deepseek.deployment.plane.feed.snapshot(time.monotonic())
        assert snapshot.expert_tokens.shape == (spec.num_moe_layers, spec.num_experts)  # routed only
        placed = snapshot.placement_load
        assert placed.shape == (spec.num_moe_layers, spec.experts_per_layer)
        tokens = snapshot.expert_tokens.sum(axis=1) / spec.top_k
        np.testing.assert_allclose(placed[:, spec.num_experts:].max(axis=1), tokens)
        target = controller.plan()
        run_on(server_loop, controller.apply(target, reason="test: replicate the shared experts"))
        time.sleep(1.5)
    finally:
        tally = driver.stop()
    assert set(tally) == {"OK"}, (tally, driver.errors[:5])
    after = deepseek.deployment.placement
    routed = np.setdiff1d(np.arange(spec.num_logical_experts), shared)
    assert after.version > before.version
    assert after.replica_counts[shared].min() >= 2, after.replica_counts  # the hottest: every token
    assert after.replica_counts[shared].min() > np.median(after.replica_counts[routed])
    assert {v for _, v in driver.outcomes} >= {before.version, after.version}  # served by both

    text = " ".join(str(c) for c in placement_table(deepseek.name, after.to_dict(), list(spec.moe_layers),
                                                    spec.num_experts, spec.num_shared_experts).columns[2]._cells)
    assert "1:s0" in text and "2:s0" in text and "1:7" in text


def test_a_random_model_with_shared_experts_is_served_exactly(deploy_served):
    start, stop = deploy_served
    served = start(serve_config("it-shared-random", random={"layers": 2, "experts": 6, "hidden": 48, "ffn": 64,
                                                            "top_k": 2, "shared_ffn": 96}, workers=2))
    try:
        assert served.spec.num_shared_experts == 2  # 96 = 64 + 32 (+ 32 zero rows)
        for tokens in (1, 33, 300):
            for layer in served.spec.moe_layers:
                served.assert_serves_correctly(layer, np.random.default_rng(tokens).standard_normal(
                    (tokens, 48), dtype=np.float32))
    finally:
        stop(served)
