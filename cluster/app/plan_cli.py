"""`moe-serve plan --checkpoint DIR --workers N --memory-per-worker 80GiB`: whether a checkpoint
fits its expert workers, before anything starts. A pure calculation (`cluster.planning.memory`)
over config.json and the safetensors headers (`workers.hf_inventory`): no weights are read."""

from __future__ import annotations

import json
from dataclasses import asdict

from rich.console import Console

from cluster.app.console import format_bytes, summary_table
from cluster.planning.memory import parse_bytes, plan_memory

DENSE_BYTES_PER_PARAM = 4  # the router holds the dense part in float32 (router_service.generation)


def add_plan_parser(sub) -> None:
    p = sub.add_parser("plan", help="will a checkpoint fit N workers of a given memory? (reads headers, no weights)")
    p.add_argument("--checkpoint", required=True, help="Hugging Face checkpoint directory")
    p.add_argument("--workers", type=int, required=True, help="expert shard workers")
    p.add_argument("--memory-per-worker", required=True, help="memory each worker gives the experts, e.g. 80GiB, "
                                                              "80GB or 81920MiB")
    p.add_argument("--reserve", type=float, default=0.1, help="fraction of each worker's memory kept free for "
                                                               "activations and the runtime (default 0.1)")
    p.add_argument("--min-replicas", type=int, default=1, help="replicas every logical expert keeps "
                                                               "(rebalance.min_replicas, default 1)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def cmd_plan(args, console: Console) -> int:
    """Exit status 0 when the model fits, 1 when it does not."""
    from workers.hf_checkpoint import HFCheckpoint
    from workers.hf_inventory import checkpoint_memory

    memory = parse_bytes(args.memory_per_worker)
    ckpt = HFCheckpoint(args.checkpoint)
    sizes = checkpoint_memory(ckpt)
    plan = plan_memory(sizes.replica_bytes, sizes.dense_params * DENSE_BYTES_PER_PARAM, args.workers, memory,
                       args.reserve, args.min_replicas)
    spec = ckpt.spec
    if args.json:
        print(json.dumps({**asdict(plan), "dense_share": plan.dense_share, "family": spec.family,
                          "expert_dtype": spec.expert_dtype, "dense_params": sizes.dense_params,
                          "dense_disk_bytes": sizes.dense_disk_bytes}, indent=2))
        return 0 if plan.fits else 1
    verdict = "[green]fits[/]" if plan.fits else "[red]does not fit[/]"
    console.print(summary_table(f"memory plan for {args.checkpoint}", {
        "model": f"{spec.family}, {spec.describe_shape()}, experts stored as {spec.expert_dtype}",
        "verdict": f"{verdict}: {plan.reason}",
        "experts (one replica each)": f"{plan.logical_experts} x up to {_gib(plan.slot_bytes)} = {_gib(plan.expert_bytes)}",
        "per worker": f"{_gib(plan.memory_per_worker)}, {_gib(plan.usable_per_worker)} usable ({args.reserve:.0%} "
                      f"kept free): {plan.slots_per_worker} slots, {plan.slots_needed_per_worker} needed",
        "slots (all workers)": f"{plan.total_slots}, " + (f"{plan.spare_slots} spare for hot-expert replicas"
                                                          if plan.spare_slots >= 0 else f"{-plan.spare_slots} short"),
        "suggested setting": f"workers.slots_per_worker: {plan.slots_per_worker}" if plan.fits else "-",
        "dense part (router)": f"{sizes.dense_params:,} params: {_gib(plan.dense_bytes)} in float32 on the "
                               f"router ({_gib(sizes.dense_disk_bytes)} on disk), {plan.dense_share:.1%} of the model",
    }))
    return 0 if plan.fits else 1


def _gib(n: int) -> str:
    return format_bytes(n)


HANDLERS = {"plan": cmd_plan}
