"""`moe-serve` as a user runs it: serve in one process, infer from another, stop with SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import yaml

from cluster.app.reference import ReferenceMoE
from cluster.config import RandomModelConfig
from tests.integration.support import FP32_REL_TOL, MARKS, free_port, health_status, rel_err, wait_until
from workers.random_model import RandomModel

pytestmark = MARKS

MOE_SERVE = str(Path(sys.executable).with_name("moe-serve"))
CLI_MODEL = "it-cli"
CLI_RANDOM = {"layers": 2, "experts": 4, "hidden": 32, "ffn": 48, "top_k": 2, "seed": 3}


def _env() -> dict[str, str]:
    env = dict(os.environ, COLUMNS="200", RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)  # no --address: the server starts its own embedded Ray
    return env


def _write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


@dataclass
class ServeProcess:
    proc: subprocess.Popen
    log: Path
    address: str

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture(scope="module")
def serve_process(tmp_path_factory) -> Iterator[ServeProcess]:
    tmp = tmp_path_factory.mktemp("cli")
    config = _write_yaml(tmp / "serve.yaml", {
        "model": {"name": CLI_MODEL, "random": CLI_RANDOM},
        "workers": {"count": 2, "num_cpus": 0.5},
        "router": {"port": 8001},  # --port overrides it
    })
    port = free_port()
    log = tmp / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [MOE_SERVE, "serve", str(config), "--port", str(port), "--drain-s", "5"],
            stdout=out, stderr=subprocess.STDOUT, env=_env(), start_new_session=True,
        )
    served = ServeProcess(proc, log, f"127.0.0.1:{port}")
    try:
        with grpc.insecure_channel(served.address) as channel:

            def serving() -> bool:
                if proc.poll() is not None:
                    raise AssertionError(f"moe-serve serve exited with {proc.returncode}:\n{served.output()}")
                try:
                    return health_status(channel, timeout_s=1) == "SERVING"
                except grpc.RpcError:
                    return False

            wait_until(serving, 120, f"moe-serve serve on {served.address} to be SERVING", poll_s=0.2)
        yield served
    finally:
        if proc.poll() is None:  # the test did not get to SIGTERM it: stop it, and its Ray with it
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


def _infer(address: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [MOE_SERVE, "infer", "--address", address, *args],
        capture_output=True, text=True, timeout=120, env=_env(),
    )


def test_infer_prints_the_table_and_saves_the_reference_answer(serve_process: ServeProcess, tmp_path: Path) -> None:
    out = tmp_path / "out.npy"
    done = _infer(serve_process.address, "--model", CLI_MODEL, "--layer", "0", "--tokens", "5",
                  "--output", str(out), "--topk")

    assert done.returncode == 0, done.stdout + done.stderr
    for text in ("inference", CLI_MODEL, "[5, 32] float32", "topk_ids (first tokens)",
                 "topk_weights (first tokens)", "placement version", f"saved output to {out}"):
        assert text in done.stdout, f"{text!r} not in:\n{done.stdout}"
    got = np.load(out)
    assert got.shape == (5, 32) and got.dtype == np.float32
    # `infer` sends seeded random hidden states (--seed, default 0): the same ones here.
    x = np.random.default_rng(0).standard_normal((5, 32), dtype=np.float32)
    reference = ReferenceMoE(RandomModel(RandomModelConfig(**CLI_RANDOM).spec(), CLI_RANDOM["seed"]))
    want, _ = reference.forward(0, torch.from_numpy(x))
    assert rel_err(got, want) < FP32_REL_TOL


def test_infer_for_an_unknown_model_exits_1_with_the_status(serve_process: ServeProcess) -> None:
    done = _infer(serve_process.address, "--model", "nope", "--layer", "0", "--tokens", "2")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "NOT_FOUND" in done.stdout and "'nope'" in done.stdout


def test_status_with_address_asks_the_router_of_an_in_process_deployment(main_server, tmp_path: Path) -> None:
    """`moe-serve status --address`: the admin API's GetStatus, for a service with no controller
    actor to find by name (as `moe-serve serve` runs it)."""

    def status(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([MOE_SERVE, "status", "--address", main_server.address, "--model", main_server.name,
                               *args], capture_output=True, text=True, timeout=120, env=_env())

    table = status()
    assert table.returncode == 0, table.stdout + table.stderr
    placement = main_server.deployment.placement
    for text in (f"moe-serve: {main_server.name}", "workers (serving / pending)", "2 / 0",
                 f"placement of {main_server.name} (v{placement.version})", main_server.address):
        assert text in table.stdout, f"{text!r} not in:\n{table.stdout}"

    done = status("--json")
    assert done.returncode == 0, done.stdout + done.stderr
    data = json.loads(done.stdout)
    assert (data["model"], data["address"]) == (main_server.name, main_server.address)
    assert [w["index"] for w in data["workers"]] == [0, 1]
    assert data["placement"]["slots"] == [list(row) for row in main_server.deployment.placement.slots]
    assert data["router_fleet"][0]["address"] == main_server.address and data["layers"] == [0, 1]

    picture = tmp_path / "status.png"
    drawn = status("--png", str(picture))
    assert drawn.returncode == 0 and picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", drawn.stdout + drawn.stderr

    unknown = subprocess.run([MOE_SERVE, "status", "--address", main_server.address, "--model", "nope"],
                             capture_output=True, text=True, timeout=120, env=_env())
    assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stdout and "'nope'" in unknown.stdout


def test_sigterm_drains_and_exits_0(serve_process: ServeProcess) -> None:
    proc = serve_process.proc
    assert proc.poll() is None, serve_process.output()
    output = serve_process.output()
    assert f"serving model {CLI_MODEL} on {serve_process.address}" in output, output

    proc.send_signal(signal.SIGTERM)
    start = time.monotonic()
    try:
        returncode = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"moe-serve serve still running 60 s after SIGTERM:\n{serve_process.output()}")

    output = serve_process.output()
    assert returncode == 0, output
    assert "draining: health NOT_SERVING" in output, output
    assert "stopped" in output.split("draining", 1)[1], output
    assert time.monotonic() - start < 60


@pytest.mark.parametrize(
    ("config", "says"),
    [
        pytest.param({"router": {"max_wait": 5}}, ["router.max_wait", "Extra inputs are not permitted"],
                     id="unknown-key"),
        pytest.param({"model": {"random": {"experts": 2, "top_k": 3}}}, ["random.top_k (3)", "random.experts (2)"],
                     id="top-k-over-experts"),
        pytest.param({"workers": {"count": "many"}}, ["workers.count", "'many'"], id="wrong-type"),
        pytest.param(None, ["cannot read config file"], id="missing-file"),
    ],
)
def test_bad_config_exits_2_naming_the_key_before_ray_starts(tmp_path: Path, config: dict | None,
                                                             says: list[str]) -> None:
    path = tmp_path / "bad.yaml"
    if config is not None:
        _write_yaml(path, config)
    # An unreachable Ray address: a CLI that connected before checking the config would hang or
    # fail on the connection instead of naming the key.
    done = subprocess.run(
        [MOE_SERVE, "serve", str(path), "--address", "127.0.0.1:1"],
        capture_output=True, text=True, timeout=30, env=_env(),
    )
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert str(path) in output, output
    for text in says:
        assert text in output, f"{text!r} not in:\n{output}"


def test_infer_with_an_input_file_of_the_wrong_dtype_exits_2_with_a_message(tmp_path: Path) -> None:
    """A user mistake in the input file gets one error line, like the other user mistakes."""
    path = tmp_path / "hidden64.npy"
    np.save(path, np.zeros((3, 32), dtype=np.float64))
    # No server is needed: the input is refused before any call.
    done = _infer(f"127.0.0.1:{free_port()}", "--input", str(path), "--layer", "0")
    output = done.stdout + done.stderr
    assert "Traceback" not in output, output
    assert done.returncode == 2, output
    assert "error:" in output and "float64" in output, output


def test_demo_replicates_hot_experts_and_serves_every_request_exactly() -> None:
    """The main job: `moe-serve demo` on its own embedded Ray, end to end."""
    done = subprocess.run(
        [MOE_SERVE, "demo", "--requests", "240", "--tokens", "96"],
        capture_output=True, text=True, env={**_env(), "COLUMNS": "200"}, timeout=240,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "240 / 0" in out  # requests served / failed
    assert "placement of moe (v0)" in out and "rebalance events" in out, out[-3000:]
    # the second part: a whole tiny model generates, streamed over HTTP, as transformers does
    assert "OpenAI-compatible HTTP on http://" in out and "4 of 4" in out, out[-3000:]
