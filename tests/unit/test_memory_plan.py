"""`moe-serve plan`: the pure memory decision (`cluster.planning.memory`) alone, memory sizes as
people write them, and the command on a checkpoint written here (headers only, no weights read)."""

from __future__ import annotations

import json

import pytest
import torch
from rich.console import Console

from cluster.app.cli import main
from cluster.model_spec import ModelSpec
from cluster.planning.memory import parse_bytes, plan_memory
from workers.random_model import RandomModel

MIB = 2**20


@pytest.mark.parametrize(("text", "want"), [
    pytest.param("80GiB", 80 * 2**30, id="GiB"),
    pytest.param("80GB", 80 * 10**9, id="GB"),
    pytest.param("81920MiB", 80 * 2**30, id="MiB-equals-GiB"),
    pytest.param("1.5TiB", 3 * 2**39, id="fraction"),
    pytest.param(" 512 kib ", 512 * 2**10, id="spaces-and-case"),
    pytest.param("4096", 4096, id="plain-bytes"),
])
def test_memory_sizes_parse(text, want) -> None:
    assert parse_bytes(text) == want


@pytest.mark.parametrize(("text", "words"), [
    pytest.param("80 gigs", ["'80 gigs'", "unknown unit 'gigs'", "GiB"], id="unknown-unit"),
    pytest.param("GiB", ["'GiB'", "not a number with a unit", "80GiB"], id="no-number"),
    pytest.param("-1GiB", ["'-1GiB'", "not a number"], id="negative"),
    pytest.param("0GiB", ["'0GiB'", "more than 0 bytes"], id="zero"),
])
def test_bad_memory_sizes_are_refused_saying_why(text, words) -> None:
    with pytest.raises(ValueError) as caught:
        parse_bytes(text)
    assert all(w in str(caught.value) for w in words), str(caught.value)


def test_golden_plan_that_fits() -> None:
    """8 experts of 1 MiB, 2 workers of 10 MiB, 10% kept free: 9 slots a worker, 4 needed."""
    plan = plan_memory([MIB] * 8, dense_bytes=8 * MIB, workers=2, memory_per_worker=10 * MIB)
    assert plan.fits
    assert (plan.slot_bytes, plan.slots_per_worker, plan.slots_needed_per_worker) == (MIB, 9, 4)
    assert (plan.total_slots, plan.spare_slots, plan.expert_bytes) == (18, 10, 8 * MIB)
    assert plan.dense_share == pytest.approx(0.5)
    assert "10 spare slots" in plan.reason


def test_a_plan_that_does_not_fit_says_how_many_workers_would() -> None:
    plan = plan_memory([MIB] * 8, dense_bytes=0, workers=1, memory_per_worker=4 * MIB)
    assert not plan.fits and plan.slots_per_worker == 3 and plan.spare_slots == -5
    assert "needs 8 slots" in plan.reason and "5 slots short" in plan.reason and "at least 3 workers" in plan.reason


def test_a_slot_is_as_large_as_the_largest_replica() -> None:
    """Shared-expert pieces or mixed dtypes: every slot must take any replica."""
    plan = plan_memory([MIB, MIB, 3 * MIB], dense_bytes=0, workers=1, memory_per_worker=10 * MIB, reserve_fraction=0)
    assert (plan.slot_bytes, plan.slots_per_worker, plan.spare_slots) == (3 * MIB, 3, 0) and plan.fits


def test_min_replicas_needs_distinct_workers() -> None:
    plan = plan_memory([MIB] * 2, dense_bytes=0, workers=1, memory_per_worker=100 * MIB, min_replicas=2)
    assert not plan.fits and "min_replicas 2" in plan.reason and "got 1" in plan.reason


@pytest.mark.parametrize("workers", [1, 2, 3, 7])
@pytest.mark.parametrize("memory_mib", [3, 8, 50])
def test_plan_invariants(workers, memory_mib) -> None:
    sizes = [MIB] * 5 + [2 * MIB] * 3
    plan = plan_memory(sizes, dense_bytes=MIB, workers=workers, memory_per_worker=memory_mib * MIB)
    assert plan.total_slots == plan.slots_per_worker * workers
    assert plan.spare_slots == plan.total_slots - len(sizes)
    assert plan.slots_per_worker * plan.slot_bytes <= plan.usable_per_worker < plan.memory_per_worker
    assert plan.fits == (plan.slots_per_worker >= plan.slots_needed_per_worker)
    assert plan.slots_needed_per_worker * workers >= len(sizes)


@pytest.mark.parametrize(("kwargs", "words"), [
    pytest.param(dict(replica_bytes=[]), ["replica_bytes", "0 sizes"], id="no-experts"),
    pytest.param(dict(replica_bytes=[MIB, 0]), ["replica_bytes", "smallest 0"], id="empty-replica"),
    pytest.param(dict(workers=0), ["workers must be a positive integer, got 0"], id="no-workers"),
    pytest.param(dict(reserve_fraction=1.0), ["reserve_fraction", "[0, 1)", "1.0"], id="reserve-everything"),
])
def test_bad_plan_inputs_are_refused(kwargs, words) -> None:
    args = {**dict(replica_bytes=[MIB] * 4, dense_bytes=0, workers=2, memory_per_worker=10 * MIB), **kwargs}
    with pytest.raises(ValueError) as caught:
        plan_memory(**args)
    assert all(w in str(caught.value) for w in words), str(caught.value)


# ---- the command ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory):
    """A BF16 Mixtral checkpoint, 2 layers of 8 experts of 3 x 64 x 128 values (48 KiB each)."""
    spec = ModelSpec(hidden_size=64, intermediate_size=128, num_experts=8, top_k=2, moe_layers=(0, 1),
                     num_hidden_layers=2)
    return RandomModel(spec, seed=0).save_mixtral_checkpoint(tmp_path_factory.mktemp("plan"), dtype=torch.bfloat16)


def _plan(capsys, *argv: str) -> tuple[int, str]:
    console = Console(width=200, record=True)
    code = main(["plan", *argv], console=console)
    return code, console.export_text() + capsys.readouterr().out


def test_plan_command_says_the_model_fits(bf16_checkpoint, capsys) -> None:
    code, out = _plan(capsys, "--checkpoint", str(bf16_checkpoint), "--workers", "2", "--memory-per-worker", "1MiB",
                      "--json")
    plan = json.loads(out)
    assert code == 0 and plan["fits"] and plan["expert_dtype"] == "bfloat16"
    assert plan["slot_bytes"] == 3 * 64 * 128 * 2 and plan["logical_experts"] == 16
    assert plan["slots_per_worker"] == int(0.9 * MIB) // (48 * 1024) and plan["spare_slots"] == 2 * 19 - 16
    code, text = _plan(capsys, "--checkpoint", str(bf16_checkpoint), "--workers", "2", "--memory-per-worker", "1MiB")
    assert code == 0 and "fits" in text and "22 spare" in text and "bfloat16" in text


def test_plan_command_says_the_model_does_not_fit(bf16_checkpoint, capsys) -> None:
    code, text = _plan(capsys, "--checkpoint", str(bf16_checkpoint), "--workers", "1", "--memory-per-worker", "256KiB")
    assert code == 1 and "does not fit" in text and "at least" in text


def test_plan_command_refuses_a_bad_size(bf16_checkpoint, capsys) -> None:
    code, text = _plan(capsys, "--checkpoint", str(bf16_checkpoint), "--workers", "1", "--memory-per-worker", "80 gigs")
    assert code != 0 and "unknown unit 'gigs'" in text


# ---- what `moe-serve status` shows ------------------------------------------------------------

def test_status_shows_the_bytes_each_worker_holds() -> None:
    from cluster.app.console import format_bytes, worker_load_table

    assert [format_bytes(n) for n in (512, 3 * 2**10, 5 * MIB + MIB // 2, 3 * 2**30 // 2)] == [
        "512 B", "3.0 KiB", "5.5 MiB", "1.50 GiB"]
    workers = [{"index": i, "node_id": "n", "replicas": 4, "weight_bytes": (i + 1) * 3 * MIB, "calls": 1, "tokens": 1,
                "busy_s": 0.0, "outstanding_tokens": 0} for i in range(2)]
    console = Console(record=True, width=160)
    console.print(worker_load_table(workers))
    text = console.export_text()
    assert "weights" in text and "3.0 MiB" in text and "6.0 MiB" in text
    console.print(worker_load_table([{k: v for k, v in w.items() if k != "weight_bytes"} for w in workers]))
    assert console.export_text().count("weights") == 0, "no column where the workers do not report it"
