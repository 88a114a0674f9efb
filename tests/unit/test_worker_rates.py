"""The observer's per-worker rates (`status --png`'s worker panel, the per-worker gauges): rated
over the load window, between the oldest and the newest look within it, not between two looks."""

from __future__ import annotations

import pytest

from cluster.control.observer import WorkerRates

WINDOW_S = 5.0


def stats(index: int, tokens: int, busy_s: float) -> dict:
    return {"index": index, "tokens": tokens, "busy_s": busy_s}


def looks(rates: WorkerRates, counters: list[tuple[float, int, float]], index: int = 0) -> tuple[float, float]:
    """Feed `(at_s, tokens, busy_s)` looks of one worker; the rate after the last one."""
    out = None
    for at_s, tokens, busy_s in counters:
        out = rates.rate([stats(index, tokens, busy_s)], at_s)[index]
    return out


def test_a_burst_then_idle_still_shows_the_burst_within_the_window():
    """600 tokens and 0.6 s of work in the first second, then idle: at every look within the
    window the worker shows the burst over the window's span, not 0 as a rate between the last
    two looks would."""
    rates = WorkerRates(WINDOW_S)
    assert looks(rates, [(0.0, 0, 0.0)]) == (0.0, 0.0), "one look: no rate yet"
    seen = [looks(rates, [(1.0, 600, 0.6)])]
    seen += [looks(rates, [(t, 600, 0.6)]) for t in (2.0, 3.0, 4.0, 5.0)]

    for t, (tps, busy) in zip((1.0, 2.0, 3.0, 4.0, 5.0), seen):
        assert tps == pytest.approx(600 / t), t
        assert busy == pytest.approx(0.6 / t), t
    assert seen[-1] == (pytest.approx(120.0), pytest.approx(0.12))  # 600 tokens over the 5 s window


def test_the_burst_leaves_once_it_is_older_than_the_window():
    rates = WorkerRates(WINDOW_S)
    looks(rates, [(0.0, 0, 0.0), (1.0, 600, 0.6)] + [(float(t), 600, 0.6) for t in range(2, 7)])
    assert looks(rates, [(7.0, 600, 0.6)]) == (0.0, 0.0), "window 2..7 s holds no work"


def test_steady_load_rates_as_before():
    rates = WorkerRates(WINDOW_S)
    tps, busy = looks(rates, [(float(t), 100 * t, 0.5 * t) for t in range(12)])
    assert (tps, busy) == (pytest.approx(100.0), pytest.approx(0.5))


def test_a_window_shorter_than_the_looks_rates_between_the_last_two():
    rates = WorkerRates(0.5)
    assert looks(rates, [(0.0, 0, 0.0), (1.0, 100, 0.2), (2.0, 400, 0.2)]) == (pytest.approx(300.0), 0.0)


def test_a_restarted_worker_starts_again_and_gone_workers_are_forgotten():
    rates = WorkerRates(WINDOW_S)
    rates.rate([stats(0, 0, 0.0), stats(1, 0, 0.0)], 0.0)
    rates.rate([stats(0, 500, 1.0), stats(1, 200, 0.1)], 1.0)
    out = rates.rate([stats(0, 10, 0.01), stats(1, 400, 0.2)], 2.0)  # worker 0's counters began again
    assert out[0] == (0.0, 0.0), "no rate across a restart (it would be negative)"
    assert out[1] == (pytest.approx(200.0), pytest.approx(0.1))
    assert set(rates.rate([stats(1, 400, 0.2)], 3.0)) == {1}
    assert rates.rate([stats(0, 50, 0.05)], 4.0)[0] == (0.0, 0.0), "a worker back after a gap starts afresh"


def test_a_worker_that_did_not_answer_shows_zero_and_keeps_its_looks():
    """`ExpertPool.stats_async` reads a worker that did not answer as zeros, `down`: no restart
    (its counters did not begin again), no spike when it answers again."""
    rates = WorkerRates(WINDOW_S)
    looks(rates, [(0.0, 0, 0.0), (1.0, 100, 0.1)])
    assert rates.rate([{**stats(0, 0, 0.0), "down": True}], 2.0)[0] == (0.0, 0.0)
    assert looks(rates, [(3.0, 300, 0.3)]) == (pytest.approx(100.0), pytest.approx(0.1))


def test_busy_fraction_is_capped_at_one():
    rates = WorkerRates(WINDOW_S)
    assert looks(rates, [(0.0, 0, 0.0), (1.0, 10, 1.5)])[1] == 1.0


@pytest.mark.parametrize("window_s", [pytest.param(0.0, id="zero"), pytest.param(-1.0, id="negative")])
def test_the_window_must_be_positive(window_s):
    with pytest.raises(ValueError, match="window_s"):
        WorkerRates(window_s)
