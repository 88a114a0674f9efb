"""The autoscaler closes the loop on Ray's fake multi-node cluster (`deploy/cluster-local.yaml`):
rising load adds a fake GPU node and a serving worker, idle load removes both, and no request
fails or comes back wrong during either.

The scenario is the live autoscaling benchmark; it runs in its own PID, mount and network
namespace, because the fake cluster runs `ray stop --force` (see `cluster.app.local_cluster`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.app.local_cluster import can_isolate
from tests.integration.support import MARKS

pytestmark = MARKS
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(can_isolate() is not None, reason=f"fake autoscaling cluster: {can_isolate()}")
def test_rising_load_adds_a_gpu_node_and_a_worker_idle_load_removes_them(tmp_path):
    out = tmp_path / "autoscale.json"
    run = subprocess.run(
        [sys.executable, "-m", "bench.bench_autoscale_live", "--out", str(out)],
        cwd=ROOT, env=dict(os.environ, RAY_AUTH_MODE="disabled"), capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0 and out.exists(), run.stdout[-4000:] + run.stderr[-4000:]
    result = json.loads(out.read_text())

    assert result["expert_nodes_at_start"] == 1  # min_workers = 1 needs one GPU node
    assert result["expert_nodes_at_peak"] == 2  # the cluster autoscaler launched a second one
    assert result["rise_to_serving_worker_s"] < 60  # the benchmark's target is 30 s
    assert result["expert_nodes_at_end"] == 1  # and reclaimed it once idle
    assert [e["action"] for e in result["scale_events"]] == ["out", "in"], result["scale_events"]
    assert "load above target" in result["scale_events"][0]["reason"]
    for phase in ("rise_requests", "fall_requests"):
        tally = result[phase]
        assert set(tally) == {"OK"} and tally["OK"] > 0, (phase, tally)
