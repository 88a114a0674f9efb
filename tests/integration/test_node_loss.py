"""Losing a node under load (`node_loss_check`, on a multi-node cluster of its own in a
subprocess): with every expert replicated and the workers spread over the nodes, no answer is
wrong, nothing but UNAVAILABLE fails (none in most runs), and the lost worker is restarted
elsewhere by Ray and reloaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.integration.node_loss_check import RESULT
from tests.integration.support import MARKS

pytestmark = MARKS

ROOT = Path(__file__).resolve().parents[2]


def test_a_lost_node_costs_a_reroute_when_experts_are_replicated() -> None:
    done = subprocess.run([sys.executable, "-m", "tests.integration.node_loss_check"], cwd=ROOT,
                          capture_output=True, text=True, timeout=280,
                          env={**os.environ, "RAY_ADDRESS": "", "RAY_AUTH_MODE": "disabled"})
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    result = json.loads(lines[-1][len(RESULT):])

    assert result["workers_on_lost_node"], result  # the node held a worker
    assert result["sent"] == sum(result["outcomes"].values())  # every request ended once
    failed = {k: v for k, v in result["outcomes"].items() if k != "OK"}
    why = (result["outcomes"], result["errors"], result["events"])
    # Most runs fail nothing; one CI run under full load had 8 of 92 UNAVAILABLE around the
    # loss (retryable, and none wrong). Anything else, or more, is a bug.
    assert set(failed) <= {"UNAVAILABLE"} and sum(failed.values()) <= 0.1 * result["sent"], why
    assert result["tail"] == ["OK"] * 10, why  # served in full once the worker is back
    assert result["recovery_s"] is not None, result  # the lost worker serves again
    assert result["new_nodes_differ"], result  # on a node that is still there
