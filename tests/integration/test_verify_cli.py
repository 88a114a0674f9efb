"""`moe-serve verify CHECKPOINT` as a user runs it: it serves the checkpoint on its own embedded
Ray and passes; pointed at a router that serves another model of the same shape, it fails."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from cluster.app.cli import main
from tests.integration.support import MARKS, serve_config
from tests.integration.test_cli import MOE_SERVE, _env
from workers.tiny_models import BY_NAME

pytestmark = MARKS
pytest.importorskip("transformers")

def _checkpoint(root: Path, seed: int) -> Path:
    path = root / f"deepseek-v3-seed{seed}"
    BY_NAME["deepseek-v3"].with_seed(seed).save(path)
    return path


def test_verify_serves_the_checkpoint_and_agrees_with_transformers(tmp_path: Path) -> None:
    checkpoint = _checkpoint(tmp_path, seed=8)
    done = subprocess.run([MOE_SERVE, "verify", str(checkpoint), "--json", "--new-tokens", "6", "--batch", "2"],
                          capture_output=True, text=True, env=_env(), timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(done.stdout[done.stdout.index("{"):])
    assert report["ok"] and report["tokens_equal"] and report["family"] == "deepseek_v3"
    assert report["rel_logit_err"] < report["logit_rel_tol"]
    assert len(report["served_tokens"]) == 2 and len(report["served_tokens"][0]) == 6
    assert report["moe_calls"] == (6 + 1) * 2  # prefill, 5 decode steps and the logits pass; 2 MoE layers


def test_verify_fails_against_a_router_serving_another_model(tmp_path: Path, deploy_served, capsys) -> None:
    served_path, other_path = _checkpoint(tmp_path, seed=8), _checkpoint(tmp_path, seed=9)
    start, stop = deploy_served
    served = start(serve_config("it-verify-other", checkpoint=str(served_path), workers=2))
    try:
        rc = main(["verify", str(other_path), "--address", served.address, "--model", served.name,
                   "--new-tokens", "4"])
    finally:
        stop(served)
    out = capsys.readouterr().out
    assert rc == 1, out
    assert "FAIL" in out and "relative logit error" in out, out
