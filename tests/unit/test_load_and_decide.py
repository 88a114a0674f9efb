"""Sliding-window load statistics and the pure rebalance trigger, with an injected clock."""

import numpy as np
import pytest

from cluster.config import RebalanceConfig
from cluster.planning.load_stats import SlidingWindowLoad
from cluster.planning.rebalance import RebalanceState, wants_plan


def test_window_sums_recent_buckets_and_forgets_old_ones():
    load = SlidingWindowLoad(2, 3, window_s=10, bucket_s=1)
    load.add(0, np.array([1, 2, 3]), now_s=100.2)
    load.add(1, np.array([5, 0, 0]), now_s=104.7)
    snap = load.snapshot(now_s=105.0)
    np.testing.assert_array_equal(snap.expert_tokens, [[1, 2, 3], [5, 0, 0]])
    assert snap.total_tokens == 11
    assert snap.window_s == pytest.approx(4.8)  # 105.0 - 100.2: less than the window so far
    # bucket 100 leaves once the window start passes it: 111 - 10 = 101 -> bucket 100 expired
    snap = load.snapshot(now_s=111.0)
    np.testing.assert_array_equal(snap.expert_tokens, [[0, 0, 0], [5, 0, 0]])
    np.testing.assert_allclose(snap.tokens_per_s, [[0, 0, 0], [0.5, 0, 0]])  # 5 tokens / 10 s


def test_window_memory_is_bounded():
    load = SlidingWindowLoad(1, 2, window_s=3, bucket_s=1)
    for t in range(1000):
        load.add(0, np.array([1, 1]), now_s=float(t))
    assert len(load._buckets) <= 4
    # window start 999.5 - 3 = 996.5: buckets 997, 998, 999 remain, 2 tokens each
    assert load.snapshot(999.5).total_tokens == 6


def test_bad_window():
    with pytest.raises(ValueError, match="bucket_s"):
        SlidingWindowLoad(1, 2, window_s=1, bucket_s=2)


CFG = RebalanceConfig(threshold=0.8, hysteresis=0.05, min_interval_s=10)


@pytest.mark.parametrize(
    ("balancedness", "state", "now", "trigger", "reason"),
    [
        pytest.param(0.9, RebalanceState(), 0.0, False, "balanced", id="balanced"),
        pytest.param(0.7, RebalanceState(), 0.0, True, "0.700 < 0.800", id="below-threshold"),
        pytest.param(0.7, RebalanceState(last_s=-5), 0.0, False, "too soon", id="too-soon"),
        pytest.param(0.7, RebalanceState(last_s=-10), 0.0, True, "0.700", id="interval-passed"),
        # after a rebalance that reached 0.72, the floor is 0.72 - 0.05 = 0.67
        pytest.param(0.70, RebalanceState(floor=0.67), 0.0, False, "hysteresis", id="in-hysteresis-band"),
        pytest.param(0.66, RebalanceState(floor=0.67), 0.0, True, "0.660 < 0.670", id="drifted-below-floor"),
    ],
)
def test_wants_plan(balancedness, state, now, trigger, reason):
    got, why, new_state = wants_plan(balancedness, state, now, CFG)
    assert got is trigger
    assert reason in why
    if trigger:
        assert new_state.last_s == now


def test_balanced_load_resets_the_floor():
    _, _, state = wants_plan(0.95, RebalanceState(floor=0.5), 0.0, CFG)
    assert state.floor == 1.0
