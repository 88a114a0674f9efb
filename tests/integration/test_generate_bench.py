"""The generation benchmark's smoke run (`python -m bench.bench_generate --quick`, its own Ray in
a subprocess): every model has every workload measured for every system, with positive figures,
and every target is judged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.integration.support import MARKS

pytestmark = MARKS

ROOT = Path(__file__).resolve().parents[2]
STREAM_SYSTEMS = ("served", "transformers_static", "transformers_continuous")


def _positive_stream(figures: dict, requests: int) -> None:
    assert figures["requests"] == requests and figures["output_tokens"] > 0, figures
    assert figures["tokens_per_s"] > 0 and figures["wall_s"] > 0, figures
    assert 0 < figures["ttft_ms"]["p50"] <= figures["ttft_ms"]["p99"], figures
    assert 0 < figures["tpot_ms"]["p50"] <= figures["tpot_ms"]["p99"], figures


def test_a_quick_generation_bench_measures_every_workload_and_system(tmp_path: Path) -> None:
    out = tmp_path / "generate.json"
    done = subprocess.run([sys.executable, "-m", "bench.bench_generate", "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=240, check=False,
                          env={**os.environ, "RAY_ADDRESS": "", "RAY_AUTH_MODE": "disabled"})
    assert done.returncode == 0 and out.exists(), done.stderr[-3000:]
    assert out.read_text() in done.stdout  # the JSON printed is the JSON written
    report = json.loads(out.read_text())

    machine = report["machine"]
    assert machine["cpus"] > 0 and machine["torch"] and machine["transformers"] and machine["ray"], machine
    work = report["settings"]["workloads"]
    assert set(report["models"]) == {"S", "Q"}, report["models"].keys()
    for name, result in report["models"].items():
        assert result["model"]["moe_layers"] > 0, (name, result["model"])
        for system in ("served", "transformers"):
            single = result["single"][system]
            assert single["ttft_ms"] > 0 and single["tpot_ms"] > 0, (name, system, single)
            assert len(single["runs"]["ttft_ms"]) == work["repeats"], (name, system, single)
            _positive_stream(result["concurrent"][system], work["concurrent"])
        _positive_stream(result["concurrent"]["served_pipelined"], work["concurrent"])
        breakdown = result["single"]["served_decode_breakdown"]
        assert breakdown["tpot_ms"] > 0 and breakdown["moe_ms_per_token"] > 0, (name, breakdown)
        assert breakdown["empty_actor_call_ms_p50"] > 0, (name, breakdown)

        mixed = result["mixed"]
        assert mixed["rate_per_s"] > 0, (name, mixed)
        # transformers' continuous batching runs on this CPU with transformers 5.25; a failure
        # is reported in the JSON (available: false, error) rather than crashing the benchmark,
        # and is a finding here
        assert mixed["transformers_continuous"].get("available"), (name, mixed["transformers_continuous"])
        for system in STREAM_SYSTEMS:
            _positive_stream(mixed[system], work["mixed"])

        checks = result["targets"]
        assert len(checks) == 6, (name, checks)
        assert all(c["ratio"] > 0 and isinstance(c["pass"], bool) for c in checks), (name, checks)
