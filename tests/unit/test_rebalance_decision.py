"""The whole rebalance decision (`cluster.planning.rebalance.decide`), pure: literal loads and
placements in, a decision with its reason and the next state out. The live controller and the
simulator both act on exactly this."""

from __future__ import annotations

import numpy as np
import pytest

from cluster.config import RebalanceConfig
from cluster.placement import Placement
from cluster.planning.planner import layer_balancedness
from cluster.planning.rebalance import RebalanceState, decide

CFG = RebalanceConfig(threshold=0.9, hysteresis=0.05, min_gain=0.03, min_interval_s=10, min_window_tokens=100)
# 1 layer x 4 experts on 2 workers of 3 slots: experts 0, 2 on worker 0; 1, 3 on worker 1; one spare each
PLACEMENT = Placement.round_robin(4, 2, slots_per_worker=3)
CAPACITY = [3, 3]
SKEWED = np.array([[800.0, 100.0, 100.0, 100.0]])  # worker 0 carries 900 of 1100
EVEN = np.array([[100.0, 100.0, 100.0, 100.0]])


def test_a_skewed_load_is_planned_and_acted_on():
    decision, state = decide(SKEWED, 1100, PLACEMENT, CAPACITY, RebalanceState(), 50.0, CFG)

    assert decision.action == "act" and decision.changes and not decision.forced
    assert decision.reason.startswith("balancedness 0.611 < 0.900")
    assert decision.balancedness_before == pytest.approx(float(layer_balancedness(PLACEMENT, SKEWED).min()))
    assert decision.balancedness_planned > decision.balancedness_before + CFG.min_gain
    assert decision.balancedness_planned == pytest.approx(float(layer_balancedness(decision.target, SKEWED).min()))
    assert len(decision.target.replicas[0]) == 2, "the hot expert gets a second replica"
    assert decision.moves == len(decision.target.replica_set - PLACEMENT.replica_set) > 0
    assert decision.target.version == PLACEMENT.version + 1
    assert state == RebalanceState(last_s=50.0, floor=decision.balancedness_planned - CFG.hysteresis)


def test_a_plan_that_gains_too_little_is_skipped_and_lowers_the_floor():
    config = CFG.model_copy(update={"min_gain": 0.9})

    decision, state = decide(SKEWED, 1100, PLACEMENT, CAPACITY, RebalanceState(), 50.0, config)

    assert decision.action == "skip" and decision.target is not None
    assert "plan gains" in decision.reason and "< min_gain 0.9" in decision.reason
    assert state.floor == pytest.approx(decision.balancedness_before - config.hysteresis)
    assert state.last_s == 50.0, "a plan was made: the interval starts again"


@pytest.mark.parametrize(
    ("load", "tokens", "state", "down", "reason"),
    [
        pytest.param(SKEWED, 99, RebalanceState(), frozenset(), "too few routed tokens in the window (99 < "
                     "min_window_tokens 100)", id="too-few-tokens"),
        pytest.param(SKEWED, 1100, RebalanceState(), frozenset({1}), "workers [1] are down", id="worker-down"),
        pytest.param(EVEN, 400, RebalanceState(), frozenset(), "balanced (1.000 >= threshold 0.9)", id="balanced"),
        pytest.param(SKEWED, 1100, RebalanceState(last_s=45.0), frozenset(), "too soon (5.0s < min_interval_s 10",
                     id="too-soon"),
        pytest.param(SKEWED, 1100, RebalanceState(floor=0.5), frozenset(), "within hysteresis (0.611 >= 0.500)",
                     id="within-hysteresis"),
    ],
)
def test_waits_without_planning(load, tokens, state, down, reason):
    decision, after = decide(load, tokens, PLACEMENT, CAPACITY, state, 50.0, CFG, down=down)

    assert decision.action == "wait" and decision.target is None and decision.moves == 0
    assert reason in decision.reason
    assert decision.balancedness_planned == decision.balancedness_before
    assert after.last_s == state.last_s


def test_a_balanced_load_resets_the_floor():
    _, state = decide(EVEN, 400, PLACEMENT, CAPACITY, RebalanceState(floor=0.4), 50.0, CFG)

    assert state.floor == 1.0


def test_force_plans_whatever_the_trigger_and_the_gain_say():
    config = CFG.model_copy(update={"min_gain": 0.9})

    decision, _ = decide(SKEWED, 0, PLACEMENT, CAPACITY, RebalanceState(floor=0.1), 50.0, config, force=True)

    assert decision.action == "act" and decision.forced and decision.changes
    assert decision.reason == "forced on demand at balancedness 0.611"


def test_force_never_moves_while_a_worker_is_down():
    decision, _ = decide(SKEWED, 1100, PLACEMENT, CAPACITY, RebalanceState(), 50.0, CFG,
                         down=frozenset({0}), force=True)

    assert decision.action == "wait" and "workers [0] are down" in decision.reason


def test_a_plan_equal_to_the_placement_in_service_changes_nothing():
    decision, _ = decide(EVEN, 400, PLACEMENT, [2, 2], RebalanceState(), 50.0, CFG, force=True)

    assert decision.action == "act" and not decision.changes and decision.moves == 0
