"""The stock Triton gRPC client, unchanged, talks to the server (KServe v2 compatibility).

`tritonclient` needs protobuf < 7, so it runs in its own venv (`tests/triton_env.py`) through
`tests/triton_check.py`, as a subprocess.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.integration.support import FP32_REL_TOL, MARKS, Served, hidden_states, rel_err
from tests.triton_env import ensure_triton_venv

pytestmark = MARKS

REPO_ROOT = Path(__file__).resolve().parents[2]
CHECK_SCRIPT = REPO_ROOT / "tests" / "triton_check.py"


@pytest.fixture(scope="module")
def triton_python() -> Path:
    return ensure_triton_venv(REPO_ROOT)  # built once (needs PyPI), reused afterwards


def _run_check(python: Path, served: Served, layer: int, x: np.ndarray, tmp_path: Path) -> tuple[dict, np.ndarray]:
    np.save(tmp_path / "in.npy", x)
    done = subprocess.run(
        [str(python), str(CHECK_SCRIPT), "--url", served.address, "--model", served.name,
         "--hidden", str(served.spec.hidden_size), "--layer", str(layer),
         "--input", str(tmp_path / "in.npy"), "--output", str(tmp_path / "out.npy"), "--timeout-s", "60"],
        capture_output=True, text=True, timeout=180,
    )
    assert done.returncode == 0, f"triton_check exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    report = json.loads(done.stdout.strip().splitlines()[-1])
    return report, np.load(tmp_path / "out.npy")


@pytest.mark.parametrize("tokens", [1, 300])
def test_stock_tritonclient_gets_the_reference_answer(triton_python: Path, main_server: Served, tmp_path: Path,
                                                       tokens: int) -> None:
    served, layer = main_server, main_server.spec.moe_layers[-1]
    x = hidden_states(tokens, served.spec.hidden_size, seed=tokens)

    report, got = _run_check(triton_python, served, layer, x, tmp_path)

    want, _, _ = served.expected(layer, x)
    assert got.dtype == np.float32
    assert rel_err(got, want) < FP32_REL_TOL
    assert (report["live"], report["ready"], report["model_ready"]) == (True, True, True)
    assert report["server_name"] == "moe-serve"
    assert report["model_name"] == served.name
    hidden, top_k = served.spec.hidden_size, served.spec.top_k
    assert report["model_inputs"] == [{"name": "hidden_states", "datatype": "FP32", "shape": [-1, hidden]}]
    assert {"name": "topk_ids", "datatype": "INT32", "shape": [-1, top_k]} in report["model_outputs"]
    assert report["hidden_states_shape"] == [tokens, hidden]
    assert report["topk_ids_shape"] == [tokens, top_k]
    assert report["topk_ids_dtype"] == "int32"


def test_stock_tritonclient_sees_a_wrong_layer_as_a_failure(triton_python: Path, main_server: Served,
                                                            tmp_path: Path) -> None:
    np.save(tmp_path / "in.npy", hidden_states(3, main_server.spec.hidden_size, seed=0))
    done = subprocess.run(
        [str(triton_python), str(CHECK_SCRIPT), "--url", main_server.address, "--model", main_server.name,
         "--hidden", str(main_server.spec.hidden_size), "--layer", "99",
         "--input", str(tmp_path / "in.npy"), "--output", str(tmp_path / "out.npy")],
        capture_output=True, text=True, timeout=180,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "triton_check: FAILED" in done.stderr
    assert "INVALID_ARGUMENT" in done.stderr and "layer 99" in done.stderr, done.stderr
    assert not (tmp_path / "out.npy").exists()
