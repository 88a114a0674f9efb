"""The admin API and its CLI on a real deployment: load, placement (show, plan, apply, export,
import) and rebalance, with the served layer equal to the reference before and after each move.

Automatic rebalancing is off, so only the tests move the placement; the workers have spare slots
for hot-expert replicas; the load window is long enough that nothing expires during the module.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from cluster.placement import Placement
from router_service.admin_client import AdminClient, tokens_per_s, window_tokens
from tests.integration.support import MARKS, Served, hidden_states, serve_config

pytestmark = MARKS

ROOT = Path(__file__).resolve().parents[2]
MODEL = "it-admin"
ADMIN_RANDOM = {"layers": 2, "experts": 4, "hidden": 32, "ffn": 48, "top_k": 2, "seed": 7}
SLOTS = 6  # per worker: 8 logical experts over 2 workers need 4, so 2 spare each
N = ADMIN_RANDOM["layers"] * ADMIN_RANDOM["experts"]


@pytest.fixture(scope="module")
def served(deploy_served) -> Iterator[Served]:
    start, stop = deploy_served
    config = serve_config(MODEL, random=ADMIN_RANDOM, workers=2).with_overrides(**{
        "workers.slots_per_worker": SLOTS,
        "rebalance.enabled": False,
        "rebalance.window_s": 3600.0,
        "rebalance.min_window_tokens": 10**9,  # an unforced rebalance always explains, never moves
    })
    served = start(config)
    yield served
    stop(served)


@pytest.fixture
def admin(served) -> Iterator[AdminClient]:
    with AdminClient(served.address, timeout_s=120) as client:
        yield client


def serves_every_layer_correctly(served: Served, seed: int) -> None:
    for i, layer in enumerate(served.spec.moe_layers):
        served.assert_serves_correctly(layer, hidden_states(64, served.spec.hidden_size, seed + i))


def edited(placement: Placement) -> Placement:
    """A different placement that fits the workers: one replica added where there is room,
    else one extra replica removed."""
    rows = [[e for e in row if e >= 0] for row in placement.slots]
    for row in rows:
        missing = [e for e in range(placement.num_logical_experts) if e not in row]
        if len(row) < SLOTS and missing:
            row.append(missing[0])
            return Placement.from_mapping(placement.version, placement.num_logical_experts, rows)
    for row in rows:
        for e in row:
            if placement.replica_counts[e] > 1:
                row.remove(e)
                return Placement.from_mapping(placement.version, placement.num_logical_experts, rows)
    raise AssertionError(f"no room to edit placement {placement}")


def replica_set(placement: Placement) -> set[tuple[int, int]]:
    return {(w, e) for w, row in enumerate(placement.slots) for e in row if e >= 0}


# ---- the API ------------------------------------------------------------------------------


def test_load_window_counts_the_routed_tokens(served, admin):
    E = served.spec.num_experts
    before = admin.load(MODEL)
    want = np.zeros((served.spec.num_moe_layers, E), dtype=np.int64)
    for i, layer in enumerate(served.spec.moe_layers):
        for seed in (1, 2):
            x = hidden_states(40 + 17 * seed, served.spec.hidden_size, 100 * i + seed)
            result = served.client.infer(MODEL, x, layer=layer, topk=True, timeout_s=60)
            _, ref_ids, _ = served.expected(layer, x)
            np.testing.assert_array_equal(result.topk_ids, ref_ids.numpy())
            want[i] += np.bincount(result.topk_ids.reshape(-1), minlength=E)
    after = admin.load(MODEL)

    np.testing.assert_array_equal(window_tokens(after) - window_tokens(before), want)
    np.testing.assert_allclose(tokens_per_s(after), window_tokens(after) / after.window_s)
    assert list(after.layers) == list(served.spec.moe_layers) and after.num_experts == E
    assert after.placement_version == served.deployment.placement.version
    assert len(after.balancedness) == served.spec.num_moe_layers
    assert all(0 < b <= 1 for b in after.balancedness)
    assert [w.index for w in after.workers] == [0, 1]
    # the workers' own counters saw the same tokens, replica by replica
    routed = np.zeros(N, dtype=np.int64)
    for w_before, w_after in zip(before.workers, after.workers):
        for e, n in w_after.replica_tokens.items():
            routed[e] += n - w_before.replica_tokens.get(e, 0)
    np.testing.assert_array_equal(routed, want.reshape(-1))


def test_get_placement_is_the_one_in_service(served, admin):
    assert admin.placement(MODEL) == served.deployment.placement


def test_plan_is_a_dry_run(served, admin):
    version = admin.placement(MODEL).version
    E = served.spec.num_experts
    hot = np.ones((served.spec.num_moe_layers, E))
    hot[0, 0] = 100.0
    plan = admin.plan(MODEL, hot)

    assert plan.current.version == version
    assert any(c.added for c in plan.changes), "with spare slots and a hot expert the plan adds replicas"
    assert plan.moves == sum(c.added for c in plan.changes)
    assert plan.balancedness_proposed[0] > plan.balancedness_current[0]
    assert len(admin.plan(MODEL).balancedness_current) == served.spec.num_moe_layers  # the window
    assert admin.placement(MODEL).version == version == served.deployment.placement.version


def test_apply_an_edited_export_moves_live_and_stays_correct(served, admin):
    serves_every_layer_correctly(served, seed=10)
    current = admin.placement(MODEL)
    exported = json.loads(json.dumps(current.to_dict()))
    target = edited(Placement.from_dict(exported))

    event = admin.apply(MODEL, target)

    assert event.applied, event.reason
    assert event.from_version == current.version and event.to_version > current.version
    assert event.moves == len(replica_set(target) - replica_set(current))
    now = admin.placement(MODEL)
    assert now.version == event.to_version == served.deployment.placement.version
    assert replica_set(now) == replica_set(target)
    serves_every_layer_correctly(served, seed=20)


def test_placement_with_the_wrong_expert_count_is_invalid_argument(served, admin):
    version = admin.placement(MODEL).version
    with pytest.raises(grpc.RpcError) as info:
        admin.apply(MODEL, Placement.round_robin(N - 2, 2, SLOTS))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"has {N - 2} logical experts" in info.value.details()
    assert admin.placement(MODEL).version == version


def test_over_capacity_is_invalid_argument(admin):
    rows = [list(range(SLOTS + 1)), list(range(SLOTS + 1, N))]
    with pytest.raises(grpc.RpcError) as info:
        admin.apply(MODEL, Placement.from_mapping(0, N, rows))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"their {SLOTS} slots" in info.value.details()


@pytest.mark.parametrize("call", [
    pytest.param(lambda a: a.load("nope"), id="load"),
    pytest.param(lambda a: a.placement("nope"), id="placement"),
    pytest.param(lambda a: a.plan("nope"), id="plan"),
    pytest.param(lambda a: a.apply("nope", Placement.round_robin(N, 2, SLOTS)), id="apply"),
    pytest.param(lambda a: a.rebalance("nope", force=True), id="rebalance"),
])
def test_unknown_model_is_not_found(admin, call):
    with pytest.raises(grpc.RpcError) as info:
        call(admin)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert f"['{MODEL}']" in info.value.details()


def test_rebalance_explains_and_force_applies(served, admin):
    # back to one replica each, so the planner has spare slots to fill
    admin.apply(MODEL, Placement.round_robin(N, 2, SLOTS))
    version = admin.placement(MODEL).version
    skipped = admin.rebalance(MODEL)
    assert not skipped.applied and "too few routed tokens" in skipped.reason
    assert (skipped.from_version, skipped.to_version) == (version, version)

    serves_every_layer_correctly(served, seed=30)
    event = admin.rebalance(MODEL, force=True)

    assert event.applied and event.reason.startswith("forced on demand"), event.reason
    assert event.from_version == version and event.to_version > version
    assert admin.placement(MODEL).version == event.to_version
    serves_every_layer_correctly(served, seed=40)
    assert admin.load(MODEL).recent_events[-1].to_version == event.to_version


# ---- the CLI ------------------------------------------------------------------------------


def cli(served: Served, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="200", PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "cluster.app.cli", *args, "--address", served.address, "--model", MODEL],
        capture_output=True, text=True, env=env, timeout=120, cwd=ROOT,
    )


def ok(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0, f"exit {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_cli_load_prints_tables_and_json(served):
    out = ok(cli(served, "load"))
    assert "tokens/s per expert" in out and "balancedness" in out
    assert "workers" in out and "outstanding" in out
    data = json.loads(ok(cli(served, "load", "--json")))
    assert data["model"] == MODEL
    assert np.asarray(data["window_tokens"]).shape == (served.spec.num_moe_layers, served.spec.num_experts)
    assert [w["index"] for w in data["workers"]] == [0, 1]


def test_cli_load_records_a_trace_the_simulator_replays(served, tmp_path):
    from cluster.sim.traces import LoadTrace

    trace_file = tmp_path / "recorded.jsonl"
    ok(cli(served, "load", "--record", str(trace_file), "--interval-s", "0.2", "--duration-s", "0.7"))
    lines = [json.loads(line) for line in trace_file.read_text().splitlines()]
    assert len(lines) >= 3 and all(l["layers"] == list(served.spec.moe_layers) for l in lines)
    assert [l["t_s"] for l in lines] == sorted(l["t_s"] for l in lines)
    trace = LoadTrace.from_jsonl(trace_file, step_s=0.2)
    assert (trace.layers, trace.experts) == (served.spec.num_moe_layers, served.spec.num_experts)
    assert trace.tokens_per_s.sum() > 0  # the module's earlier requests are in the window


def test_cli_placement_show(served, admin):
    version = admin.placement(MODEL).version
    out = ok(cli(served, "placement", "show"))
    assert f"(v{version})" in out and "layer:expert" in out and "1:3" in out
    data = json.loads(ok(cli(served, "placement", "show", "--json")))
    assert data["model"] == MODEL and Placement.from_dict(data) == admin.placement(MODEL)


def test_cli_placement_plan(served, admin, tmp_path):
    version = admin.placement(MODEL).version
    out = ok(cli(served, "placement", "plan"))
    assert "balancedness per layer" in out and "replica changes" in out
    load_file = tmp_path / "load.json"
    load_file.write_text(ok(cli(served, "load", "--json")))
    proposed = tmp_path / "proposed.json"
    out = ok(cli(served, "placement", "plan", "--load", str(load_file), "--output", str(proposed)))
    assert str(load_file) in out
    assert json.loads(proposed.read_text())["model"] == MODEL
    assert admin.placement(MODEL).version == version


def test_cli_export_edit_import(served, admin, tmp_path):
    exported = tmp_path / "placement.json"
    ok(cli(served, "placement", "export", str(exported)))
    data = json.loads(exported.read_text())
    assert data["model"] == MODEL
    current = admin.placement(MODEL)
    assert Placement.from_dict(data) == current

    target = edited(current)
    exported.write_text(json.dumps({"model": MODEL, **target.to_dict()}))
    serves_every_layer_correctly(served, seed=50)
    out = ok(cli(served, "placement", "import", str(exported)))

    assert "rebalance event" in out and "yes" in out
    now = admin.placement(MODEL)
    assert now.version > current.version and replica_set(now) == replica_set(target)
    serves_every_layer_correctly(served, seed=60)


def test_cli_rebalance(served, admin):
    out = ok(cli(served, "rebalance"))
    assert "rebalance event" in out and "too few routed tokens" in out
    out = ok(cli(served, "rebalance", "--force", "--json"))
    event = json.loads(out)
    assert event["to_version"] == admin.placement(MODEL).version
    # a forced rebalance applies its plan, unless the plan is already the placement in service
    assert event["applied"] is True or "is the placement in service" in event["reason"], event


BAD_FILES = [
    pytest.param(None, "cannot read placement file", id="missing"),
    pytest.param("{not json", "is not JSON", id="not-json"),
    pytest.param('[[0, 1], [2, 3]]', "must hold a JSON object", id="a-list"),
    pytest.param('{"model": "it-admin", "version": 0, "slots": [[0]]}', "missing key 'num_logical_experts'", id="missing-key"),
    pytest.param('{"version": 0, "num_logical_experts": 8, "slots": [[0]]}', "names no model", id="no-model"),
    pytest.param('{"model": "other", "version": 0, "num_logical_experts": 8, "slots": [[0]]}', "is for model 'other'", id="other-model"),
    pytest.param('{"model": "it-admin", "version": 0, "num_logical_experts": 8, "slots": [[0, 0]]}', "not a valid placement", id="duplicate"),
]


@pytest.mark.parametrize("content, message", BAD_FILES)
def test_cli_bad_import_file_exits_2_naming_the_file(served, admin, tmp_path, content, message):
    path = tmp_path / "bad.json"
    if content is not None:
        path.write_text(content)
    version = admin.placement(MODEL).version
    done = cli(served, "placement", "import", str(path))
    assert done.returncode == 2, done.stdout + done.stderr
    assert message in done.stdout and str(path) in done.stdout
    assert admin.placement(MODEL).version == version


def test_cli_rejected_import_exits_1_with_the_status(served, tmp_path):
    path = tmp_path / "six.json"
    path.write_text(json.dumps({"model": MODEL, **Placement.round_robin(N - 2, 2, SLOTS).to_dict()}))
    done = cli(served, "placement", "import", str(path))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "INVALID_ARGUMENT" in done.stdout and "logical experts" in done.stdout


def test_cli_unknown_model_exits_1(served):
    env = dict(os.environ, COLUMNS="200", PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, "-m", "cluster.app.cli", "load", "--address", served.address, "--model", "nope"],
        capture_output=True, text=True, env=env, timeout=120, cwd=ROOT,
    )
    assert done.returncode == 1 and "NOT_FOUND" in done.stdout
