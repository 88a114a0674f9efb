"""The expert skipping benchmark's smoke run (`python -m bench.bench_skip --quick`, its own Ray in a
subprocess): every family and threshold is measured, threshold 0 is the unskipped baseline to the
bit, a higher threshold never skips less, the largest skips something, and the picture is drawn
(also again from the JSON alone)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.integration.support import MARKS

pytestmark = MARKS

ROOT = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_a_quick_skip_bench_measures_every_family_and_threshold(tmp_path: Path) -> None:
    out, png = tmp_path / "skip.json", tmp_path / "skip.png"
    done = subprocess.run([sys.executable, "-m", "bench.bench_skip", "--quick", "--out", str(out), "--plot", str(png)],
                          cwd=ROOT, capture_output=True, text=True, timeout=180, check=False,
                          env={**os.environ, "RAY_ADDRESS": "", "RAY_AUTH_MODE": "disabled"})
    assert done.returncode == 0 and out.exists(), done.stderr[-3000:]
    assert out.read_text() in done.stdout  # the JSON printed is the JSON written
    report = json.loads(out.read_text())
    settings = report["settings"]
    assert report["machine"]["cpus"] > 0 and settings["quick"]

    assert list(report["families"]) == list(settings["families"])
    for name, result in report["families"].items():
        rows = result["thresholds"]
        assert [r["threshold"] for r in rows] == settings["thresholds"], name
        base = rows[0]
        assert base["threshold"] == 0 and base["skipped_expert_tokens"] == 0, (name, base)
        assert base["greedy_agreement"] == 1.0 and base["logit_max_abs_error"] == 0.0, (name, base)
        fractions = [r["skipped_fraction"] for r in rows]
        assert fractions == sorted(fractions), (name, fractions)
        assert fractions[-1] > 0, f"{name}: threshold {rows[-1]['threshold']} skipped nothing"
        for r in rows:
            assert r["tokens_per_s"] > 0 and r["sent_expert_tokens"] > 0, (name, r)
            assert 0 <= r["greedy_agreement"] <= 1 and 0 <= r["top1_agreement"] <= 1, (name, r)
            assert (r["skipped_expert_tokens"] == 0) == (r["logit_max_abs_error"] == 0.0), (name, r)

    layer = report["layer"]["thresholds"]
    want = settings["thresholds"] + settings["layer_extra_thresholds"]
    assert [r["threshold"] for r in layer] == want and layer[0]["speedup"] == 1.0
    assert all(r["tokens_per_s"] > 0 for r in layer) and layer[-1]["skipped_fraction"] > 0

    assert png.read_bytes()[:8] == PNG_MAGIC
    again = tmp_path / "again.png"
    redraw = subprocess.run([sys.executable, "-m", "bench.bench_skip", "--from-json", str(out), "--plot", str(again)],
                            cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert redraw.returncode == 0 and again.read_bytes()[:8] == PNG_MAGIC, redraw.stderr[-2000:]
