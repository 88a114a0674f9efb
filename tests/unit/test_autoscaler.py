"""The autoscaler's pure decision, with an injected clock: thresholds, delays, bounds, hysteresis."""

import pytest

from cluster.config import AutoscalingConfig
from cluster.planning.autoscaler import AutoscaleState, RouterSnapshot, ScaleSnapshot, decide, decide_routers

# target 1000 tok/s per worker; scale in only below 0.5 x 1000 = 500 per remaining worker
CFG = AutoscalingConfig(
    enabled=True, target_tokens_per_s_per_worker=1000, max_queue_delay_ms=100,
    downscale_utilization=0.5, upscale_delay_s=5, downscale_delay_s=30, max_step=2,
)
BOUNDS = (1, 8)


def snap(tps: float, serving: int, pending: int = 0, queue_ms: float = 0.0, migrating: bool = False) -> ScaleSnapshot:
    return ScaleSnapshot(tokens_per_s=tps, serving_workers=serving, pending_workers=pending,
                         queue_delay_ms=queue_ms, migrating=migrating)


@pytest.mark.parametrize(
    ("snapshot", "action", "target", "reason"),
    [
        # 2500 tok/s on 2 workers = 1250 each > 1000: ceil(2500 / 1000) = 3
        pytest.param(snap(2500, 2), "out", 3, "load above target", id="load-above-target"),
        # 7000 on 2: ceil(7000 / 1000) = 7, but at most max_step = 2 more -> 4
        pytest.param(snap(7000, 2), "out", 4, "load above target", id="out-limited-by-max-step"),
        # 20000 on 7: ceil(20) capped by max_step (9) and by max_workers 8 -> 8
        pytest.param(snap(20000, 7), "out", 8, "load above target", id="out-limited-by-max-workers"),
        # 1500 on 2 = 750 each, under target, but the queue waits 150 ms > 100: one more -> 3
        pytest.param(snap(1500, 2, queue_ms=150), "out", 3, "queue delay above 100 ms", id="queue-delay"),
        # 1500 on 2 + 1 pending = 500 each, queue 150 ms: the pending worker will shorten it: hold
        pytest.param(snap(1500, 2, pending=1, queue_ms=150), "hold", 3, "waiting for 1 pending workers",
                     id="queue-delay-waits-for-pending"),
        # 1800 on 2 = 900 each: under target; one fewer would carry 1800 > 500: hold
        pytest.param(snap(1800, 2), "hold", 2, "tok/s per worker", id="in-band"),
        # 900 on 4: 3 workers would carry 300 < 500 each: ceil(900 / 500) = 2
        pytest.param(snap(900, 4), "in", 2, "would carry < 500", id="load-below-floor"),
        # 100 on 8: ceil(100 / 500) = 1, but at most max_step = 2 fewer -> 6
        pytest.param(snap(100, 8), "in", 6, "would carry", id="in-limited-by-max-step"),
        # 0 on 1 = min_workers: nothing to remove
        pytest.param(snap(0, 1), "hold", 1, "tok/s per worker", id="idle-at-min"),
        # 900 on 3 + 1 pending = 4 counted at 225 each: pending workers block scaling in
        pytest.param(snap(900, 3, pending=1), "hold", 4, "tok/s per worker", id="pending-blocks-in"),
        # 4500 on 3 + 1 pending = 4 counted, 1125 each > 1000: ceil(4.5) = 5
        pytest.param(snap(4500, 3, pending=1), "out", 5, "load above target", id="pending-counted"),
        # 3000 on 2 + 1 pending = 3 counted, 1000 each: not above target, wait for the pending one
        pytest.param(snap(3000, 2, pending=1), "hold", 3, "tok/s per worker", id="pending-covers-load"),
        # 900 on 4, queue 60 ms > 0.5 x 100: a short load with a long queue does not scale in
        pytest.param(snap(900, 4, queue_ms=60), "hold", 4, "tok/s per worker", id="queue-blocks-in"),
        # 50000 on 8 = max_workers: hold and say so
        pytest.param(snap(50000, 8), "hold", 8, "at workers.max_workers (8)", id="at-max"),
        pytest.param(snap(50000, 2, migrating=True), "hold", 2, "placement change is running", id="migrating"),
    ],
)
def test_decision_once_the_delay_has_passed(snapshot, action, target, reason):
    # the same wish since t=0, now t=100: both delays (5 s, 30 s) have passed
    state = AutoscaleState(action, 0.0) if action != "hold" else AutoscaleState()
    decision, _ = decide(snapshot, state, 100.0, CFG, BOUNDS)
    assert (decision.action, decision.target_workers) == (action, target), decision.reason
    assert reason in decision.reason


@pytest.mark.parametrize(
    ("snapshot", "bounds", "action", "target"),
    [
        pytest.param(snap(0, 1), (2, 8), "out", 2, id="below-min"),
        pytest.param(snap(99999, 6), (1, 4), "in", 4, id="above-max"),
    ],
)
def test_bounds_are_restored_at_once(snapshot, bounds, action, target):
    decision, state = decide(snapshot, AutoscaleState(), 0.0, CFG, bounds)
    assert (decision.action, decision.target_workers) == (action, target)
    assert "workers.m" in decision.reason
    assert state == AutoscaleState()


def test_scale_out_waits_for_the_upscale_delay():
    high = snap(2500, 2)
    decision, state = decide(high, AutoscaleState(), 10.0, CFG, BOUNDS)
    assert decision.action == "hold" and "waiting 0.0s of 5s" in decision.reason
    assert state == AutoscaleState("out", 10.0)
    decision, state = decide(high, state, 14.9, CFG, BOUNDS)  # 4.9 s < 5 s
    assert decision.action == "hold" and "waiting 4.9s" in decision.reason
    decision, state = decide(high, state, 15.0, CFG, BOUNDS)  # 5 s: act
    assert (decision.action, decision.target_workers) == ("out", 3)
    assert state.wish is None  # the next wish starts its own delay


def test_a_break_in_the_wish_restarts_the_delay():
    state = AutoscaleState()
    _, state = decide(snap(900, 4), state, 0.0, CFG, BOUNDS)  # wants in from t=0
    _, state = decide(snap(900, 4), state, 20.0, CFG, BOUNDS)
    decision, state = decide(snap(1800, 4), state, 25.0, CFG, BOUNDS)  # 3 x 500 < 1800: no wish
    assert decision.action == "hold" and state == AutoscaleState()
    decision, state = decide(snap(900, 4), state, 40.0, CFG, BOUNDS)  # starts again at t=40
    assert decision.action == "hold" and state.since_s == 40.0
    decision, _ = decide(snap(900, 4), state, 69.0, CFG, BOUNDS)  # 29 s < 30 s
    assert decision.action == "hold"
    decision, _ = decide(snap(900, 4), state, 70.0, CFG, BOUNDS)
    assert (decision.action, decision.target_workers) == ("in", 2)


def test_turning_from_out_to_in_restarts_the_delay():
    _, state = decide(snap(2500, 2), AutoscaleState(), 0.0, CFG, BOUNDS)
    assert state.wish == "out"
    decision, state = decide(snap(100, 4), state, 100.0, CFG, BOUNDS)
    assert decision.action == "hold" and state == AutoscaleState("in", 100.0)


def test_hysteresis_band_holds_between_out_and_in():
    # On 4 workers: out above 4 x 1000 = 4000 tok/s, in below 3 x 500 = 1500; between: hold
    for tps, action in [(4001, "out"), (4000, "hold"), (1500, "hold"), (1499, "in")]:
        decision, _ = decide(snap(tps, 4), AutoscaleState(action, 0.0), 100.0, CFG, BOUNDS)
        assert decision.action == action, (tps, decision.reason)


def test_zero_delays_act_on_the_first_look():
    cfg = AutoscalingConfig(enabled=True, target_tokens_per_s_per_worker=1000, upscale_delay_s=0,
                            downscale_delay_s=0)
    decision, _ = decide(snap(2500, 2), AutoscaleState(), 0.0, cfg, BOUNDS)
    assert (decision.action, decision.target_workers) == ("out", 3)


# ---- routers (the dense side) -------------------------------------------------------------------


ROUTERS = (1, 4)


@pytest.mark.parametrize(
    ("snapshot", "action", "target", "trigger", "reason"),
    [
        pytest.param(RouterSnapshot(1, running=8, waiting=9, max_num_seqs=8), "out", 2, "waiting",
                     "9 waiting on 1 routers", id="requests-wait"),
        pytest.param(RouterSnapshot(2, running=10, waiting=1, kv_used_max=0.95, max_num_seqs=8), "out", 3, "kv",
                     "KV cache up to 95%", id="cache-full"),
        pytest.param(RouterSnapshot(4, running=30, waiting=40, max_num_seqs=8), "hold", 4, "waiting",
                     "at router.max_count (4)", id="at-max"),
        pytest.param(RouterSnapshot(1, running=8, waiting=9, pending=1, max_num_seqs=8), "hold", 2, "load",
                     "waiting for 1 routers to start", id="pending"),
        pytest.param(RouterSnapshot(3, running=3, max_num_seqs=8), "in", 2, "load", "2 routers would run them",
                     id="idle"),
        pytest.param(RouterSnapshot(2, running=6, max_num_seqs=8), "hold", 2, "load", "on 2 routers", id="busy-enough"),
        pytest.param(RouterSnapshot(5, max_num_seqs=8), "in", 4, "bounds", "above router.max_count", id="above-bounds"),
    ],
)
def test_router_decisions(snapshot, action, target, trigger, reason):
    config = CFG.model_copy(update={"upscale_delay_s": 0.0, "downscale_delay_s": 0.0, "router_max_waiting": 4})

    decision, _ = decide_routers(snapshot, AutoscaleState(), 100.0, config, ROUTERS)

    assert (decision.action, decision.target_routers, decision.trigger) == (action, target, trigger)
    assert reason in decision.reason


def test_router_scale_out_waits_for_its_delay_without_a_break():
    config = CFG.model_copy(update={"upscale_delay_s": 5.0, "router_max_waiting": 0})
    busy, quiet = RouterSnapshot(1, running=4, waiting=2, max_num_seqs=4), RouterSnapshot(1, running=4, max_num_seqs=4)

    first, state = decide_routers(busy, AutoscaleState(), 10.0, config, ROUTERS)
    broken, state = decide_routers(quiet, state, 12.0, config, ROUTERS)
    again, state = decide_routers(busy, state, 13.0, config, ROUTERS)
    later, state = decide_routers(busy, state, 18.0, config, ROUTERS)

    assert [d.action for d in (first, broken, again, later)] == ["hold", "hold", "hold", "out"]
    assert "waiting 0.0s of 5s" in first.reason and later.target_routers == 2
