"""Status tables: a down worker and the worker fault events read at a glance."""

from __future__ import annotations

from rich.console import Console

from cluster.app.console import worker_events_table, worker_load_table


def _text(renderable) -> str:
    console = Console(record=True, width=160)
    console.print(renderable)
    return console.export_text()


def test_a_down_worker_is_marked_in_the_workers_table():
    workers = [{"index": i, "node_id": "n" * 20, "replicas": 4, "calls": 9, "tokens": 90, "busy_s": 0.5,
                "outstanding_tokens": 0, "down": i == 1} for i in range(2)]

    lines = _text(worker_load_table(workers)).splitlines()

    assert any("1 down" in line for line in lines)
    assert not any("0 down" in line for line in lines)


def test_worker_events_show_kind_workers_and_detail():
    events = [{"age_s": 3.2, "kind": "lost", "workers": (1,), "duration_s": 0.0,
               "detail": "worker 1 stopped answering; routing around it"},
              {"age_s": 1.0, "kind": "reloaded", "workers": (1,), "duration_s": 0.4,
               "detail": "worker 1 serves again with 6 replicas"}]

    text = _text(worker_events_table(events))

    assert "lost" in text and "reloaded" in text and "routing around it" in text and "0.40" in text
