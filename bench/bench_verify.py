"""The whole-model check of every family, as figures: for each tiny model of
`workers/tiny_models.py`, serve its checkpoint, generate greedily with `transformers` alone and
through the served MoE layers (`cluster.app.verify`), and print one JSON object per family plus a
summary: same tokens, the logits' relative error, and the generation times.

    python -m bench.bench_verify [--new-tokens 16] [--batch 2] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from pathlib import Path

from cluster.app.launcher import connect_ray
from cluster.app.verify import serve_and_verify
from cluster.config import RayConfig
from workers.hf_checkpoint import HFCheckpoint
from workers.tiny_models import FAMILIES, TinyFamily


async def _one(family: TinyFamily, root: Path, args) -> dict:
    path = root / family.name
    model = family.save(path)
    spec = HFCheckpoint(path).spec
    report = await serve_and_verify(str(path), model, spec, args.workers, name=family.name, new_tokens=args.new_tokens,
                                    prompt_tokens=args.prompt_tokens, batch=args.batch, seed=family.seed)
    result = report.to_dict()
    keep = ("family", "ok", "tokens_equal", "first_mismatch", "rel_logit_err", "max_abs_logit_err", "moe_calls",
            "reference_s", "served_s")
    return {"case": family.name, **{k: result[k] for k in keep}, "shared_pieces": spec.num_shared_experts,
            "moe_layers": spec.describe_layers(), "dense_layers": spec.describe_dense_layers()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=8)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    connect_ray(RayConfig(namespace="moe-serve-bench"), num_cpus=max(2, os.cpu_count() or 2))

    async def run() -> list[dict]:
        results = []
        with tempfile.TemporaryDirectory() as tmp:
            for family in FAMILIES:
                print(f"# verifying {family.name} ...", file=sys.stderr, flush=True)
                results.append(await _one(family, Path(tmp), args))
                print(json.dumps(results[-1]), flush=True)
        return results

    results = asyncio.run(run())
    summary = {"families": len(results), "all_ok": all(r["ok"] for r in results),
               "worst_rel_logit_err": max(r["rel_logit_err"] for r in results)}
    print(json.dumps({"summary": summary}))
    if args.out:
        Path(args.out).write_text(json.dumps({"results": results, "summary": summary}, indent=2) + "\n")
    return 0 if summary["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
