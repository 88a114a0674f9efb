"""Why shared experts count in the placement's load: balancedness of DeepSeek-shaped layers
with shared experts, planned on the placed load (routed + every token through each shared
piece) versus on the routed load alone (shared pieces seen as idle), versus round robin. Pure
planner arithmetic on synthetic Zipf routing, no Ray; prints JSON.

    python -m bench.bench_shared [--layers 4] [--workers 8] [--s 1.0]

Model: DeepSeek-V2-Lite's shape per layer, 64 routed experts (top-6) and a shared MLP of 2
expert sizes (2 pieces); every worker has 25% spare slots (the service's default). Routed load:
tokens routed over a window of 2^16 tokens, experts Zipf-popular with exponent `s` (top-k
without replacement, Gumbel trick). Balancedness = mean / max worker load under the true
(placed) load, per layer; the figure is the worst layer.
"""

from __future__ import annotations

import argparse

import numpy as np

from bench.render import emit
from cluster.model_spec import ModelSpec
from cluster.placement import Placement, slots_per_worker
from cluster.planning.planner import layer_balancedness, plan_placement

ROUTED, TOP_K, FFN, SHARED_FFN, TOKENS = 64, 6, 1408, 2816, 1 << 16


def routed_load(layers: int, s: float, rng: np.random.Generator) -> np.ndarray:
    """`[L, E]` tokens routed per expert over a window: Zipf popularity, top-k without replacement."""
    load = np.zeros((layers, ROUTED))
    for layer in range(layers):
        logp = -s * np.log(np.arange(1, ROUTED + 1))[rng.permutation(ROUTED)]
        picks = np.argsort(-(logp + rng.gumbel(size=(TOKENS, ROUTED))), axis=1)[:, :TOP_K]
        load[layer] = np.bincount(picks.reshape(-1), minlength=ROUTED)
    return load


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--s", type=float, nargs="+", default=[0.0, 0.6, 1.0, 1.4], help="Zipf exponents")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    spec = ModelSpec(hidden_size=2048, intermediate_size=FFN, num_experts=ROUTED, top_k=TOP_K,
                     moe_layers=tuple(range(args.layers)), num_hidden_layers=args.layers,
                     shared_intermediate_size=SHARED_FFN)
    slots = slots_per_worker(spec.num_logical_experts, args.workers, None)
    capacity = [slots] * args.workers
    shared = [m * spec.experts_per_layer + ROUTED + p for m in range(args.layers) for p in range(spec.num_shared_experts)]
    rng = np.random.default_rng(0)
    rows = []
    for s in args.s:
        routed = routed_load(args.layers, s, rng)
        placed = spec.placed_load(routed)
        blind = np.hstack([routed, np.zeros((args.layers, spec.num_shared_experts))])  # shared pieces seen idle
        plans = {
            "round_robin": Placement.round_robin(spec.num_logical_experts, args.workers, slots),
            "planned_on_routed_only": plan_placement(blind, capacity),
            "planned_on_placed_load": plan_placement(placed, capacity),
        }
        rows.append({
            "zipf_s": s,
            **{f"{name}_balancedness": round(float(layer_balancedness(p, placed).min()), 3) for name, p in plans.items()},
            "shared_replicas_planned": int(plans["planned_on_placed_load"].replica_counts[shared].min()),
        })
    report = {
        "model": {"layers": args.layers, "routed": ROUTED, "top_k": TOP_K, "shared_pieces": spec.num_shared_experts,
                  "shared_share_of_load": round(spec.num_shared_experts / (TOP_K + spec.num_shared_experts), 3)},
        "workers": args.workers, "slots_per_worker": slots, "results": rows,
        "targets": {"placed_load_beats_routed_only_everywhere": all(
            r["planned_on_placed_load_balancedness"] > r["planned_on_routed_only_balancedness"] for r in rows)},
    }
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
