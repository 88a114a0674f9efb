"""The soak benchmark's smoke run (`python -m bench.bench_soak --quick`, its own Ray in a
subprocess, in the `moe-serve deploy` layout): every request ends once, none is wrong, and each
of the three faults (a worker killed, a worker hung, the controller killed) is noticed and
served again; memory is measured for every process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.integration.support import MARKS

pytestmark = MARKS

ROOT = Path(__file__).resolve().parents[2]


def test_a_quick_soak_loses_no_request_and_serves_again_after_every_fault(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    done = subprocess.run([sys.executable, "-m", "bench.bench_soak", "--quick", "--out", str(out)], cwd=ROOT,
                          check=False, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "RAY_ADDRESS": "", "RAY_AUTH_MODE": "disabled"})
    assert done.returncode == 0 and out.exists(), done.stderr[-3000:]
    report = json.loads(out.read_text())

    requests = report["requests"]
    assert requests["sent"] > 100, requests
    assert requests["sent"] == sum(requests["outcomes"].values()), requests  # every request ended once
    assert not [o for o in requests["outcomes"] if o.startswith("wrong")], requests  # no answer wrong
    # Every expert has two replicas on different workers (min_replicas 2 holds through the
    # forced rebalances), the router sends a lost or hung worker's shares again to the other
    # replica, and requests never pass through the controller: no fault costs a request. A
    # failure here is a real finding; `failures` has each one's time and details.
    assert requests["not_ok"] == 0, (requests, report["failures"])
    fp16 = report["fp16"]
    assert fp16["sent"] > 0 and fp16["sent_equals_outcomes"], fp16
    assert not [o for o in fp16["outcomes"] if o.startswith("wrong")], fp16

    faults = {f["fault"]: f for f in report["faults"]}
    assert set(faults) == {"worker kill", "worker hang", "controller kill"}, faults
    for fault in faults.values():
        assert fault.get("injected_at_s") is not None and fault["noticed_after_s"] is not None, fault
        assert fault["served_again_after_s"] is not None, fault  # see not_in_charge for the controller
        assert fault["noticed_after_s"] <= fault["served_again_after_s"], fault
        assert fault["requests_failed_around"] == 0, fault

    kill = faults["worker kill"]
    assert kill["events"][0]["kind"] == "lost", kill
    assert kill["pid_after"] and kill["pid_after"] != kill["pid_before"], kill  # another process serves its place

    hang = faults["worker hang"]
    hung = hang["hang_request"][-1]  # earlier attempts (if any) got no share on the worker
    assert hung["outcome"] == "OK" and hung["answered_after_s"] >= report["config"]["share_timeout_s"], hang
    assert "hangs" in hang["events"][0]["detail"], hang  # the supervisor saw its math run too long
    assert hang["pid_after"] and hang["pid_after"] != hang["pid_before"], hang

    controller = faults["controller kill"]
    assert controller["pid_after"] and controller["pid_after"] != controller["pid_before"], controller
    assert controller["takeover_s"] is not None, controller

    assert report["rebalances"]["applied"] >= 1 and report["rebalances"]["bytes_moved"] > 0, report["rebalances"]
    assert report["placement"]["min_replicas_end"] >= 2, report["placement"]  # still absorbs a kill

    processes = report["memory"]["processes"]
    names = {p["process"] for p in processes}
    assert {"bench", "router", "controller", "worker-0", "worker-1", "worker-2"} <= names, names
    for p in processes:
        assert p["start_mib"] > 0 and p["end_mib"] > 0 and p["max_mib"] >= p["end_mib"], p
    router = next(p for p in processes if p["process"] == "router")
    assert router["second_half"] is not None and router["second_half"]["requests"] > 0, router
