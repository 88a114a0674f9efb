"""The per-layer latency benchmark's smoke run (`python -m bench.bench_latency --quick`, its own
Ray in a subprocess): every token count has the router's dispatch (three transports), the layer
API and every floor, with positive figures and overheads no larger than their round trips."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.integration.support import MARKS

pytestmark = MARKS

ROOT = Path(__file__).resolve().parents[2]
FLOORS = ("in_process", "actor_call", "actor_calls_awaited", "compiled_channel", "grpc_echo")
DISPATCH = ("dispatch", "dispatch_via_object_store", "dispatch_compiled_graph")


def test_a_quick_latency_bench_measures_every_path_beside_its_floors(tmp_path: Path) -> None:
    out = tmp_path / "latency.json"
    done = subprocess.run([sys.executable, "-m", "bench.bench_latency", "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=240, check=False,
                          env={**os.environ, "RAY_ADDRESS": "", "RAY_AUTH_MODE": "disabled"})
    assert done.returncode == 0 and out.exists(), done.stderr[-3000:]
    report = json.loads(out.read_text())
    (shape,) = report["shapes"].values()
    assert set(shape["tokens"]) == {"1", "16", "128"}, shape["tokens"].keys()
    for tokens, point in shape["tokens"].items():
        for name in (*FLOORS, *DISPATCH, "layer_api"):
            figures = point[name]
            assert 0 < figures["p50_ms"] <= figures["p90_ms"], (tokens, name, figures)
        for name in DISPATCH:
            assert point[name]["overhead_p50_ms"] <= point[name]["p50_ms"], (tokens, name, point[name])
