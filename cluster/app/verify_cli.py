"""`moe-serve verify CHECKPOINT`: run the checkpoint's whole model with `transformers`, alone and
with its MoE blocks served (see `cluster.app.verify`), and say whether they agree.

Without `--address` it serves the checkpoint itself on an embedded Ray for the check; with one
it checks a router already serving the same checkpoint."""

from __future__ import annotations

import asyncio
import json
import os

from rich.console import Console
from rich.table import Table

from cluster.app.client_flags import add_client_flags, client_credentials
from cluster.app.console import load_progress
from cluster.app.verify import LOGIT_REL_TOL, VerifyReport, load_hf_model, serve_and_verify, verify_at
from cluster.config import RayConfig
from cluster.model_spec import ModelSpec


def add_verify_parser(sub) -> None:
    p = sub.add_parser("verify", help="check the served MoE layers against transformers: greedy tokens and logits")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="Hugging Face checkpoint directory")
    p.add_argument("--address", help="router already serving CHECKPOINT (host:port); default: serve it here")
    p.add_argument("--model", default="moe", help="model name at --address (default: moe)")
    p.add_argument("--workers", type=int, default=2, help="expert shard workers when serving here")
    p.add_argument("--new-tokens", type=int, default=16, help="greedy tokens to generate per prompt")
    p.add_argument("--prompt-tokens", type=int, default=8, help="random prompt length")
    p.add_argument("--batch", type=int, default=2, help="prompts generated together")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    add_client_flags(p)


def cmd_verify(args, console: Console) -> int:
    from workers.hf_checkpoint import HFCheckpoint

    spec = HFCheckpoint(args.checkpoint).spec
    console.print(f"verifying {args.checkpoint}: {spec.family}, MoE layers {spec.describe_layers()}, dense "
                  f"{spec.describe_dense_layers()}, {spec.num_experts} routed + {spec.num_shared_experts} shared "
                  "experts per layer", highlight=False)
    model = load_hf_model(args.checkpoint)
    options = {"new_tokens": args.new_tokens, "prompt_tokens": args.prompt_tokens, "batch": args.batch, "seed": args.seed}
    if args.address:
        report = verify_at(args.address, args.model, model, spec, client_credentials(args), **options)
    else:
        report = _serve_and_verify(args.checkpoint, args.workers, model, spec, options, console)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        console.print(report_table(report))
    return 0 if report.ok else 1


def _serve_and_verify(checkpoint: str, workers: int, model, spec: ModelSpec, options: dict,
                      console: Console) -> VerifyReport:
    from cluster.app.launcher import connect_ray

    connect_ray(RayConfig(), num_cpus=max(2, os.cpu_count() or 2))

    async def run() -> VerifyReport:
        with load_progress(console) as progress:
            return await serve_and_verify(checkpoint, model, spec, workers, progress=progress, **options)

    return asyncio.run(run())


def report_table(report: VerifyReport) -> Table:
    verdict = "[green]PASS[/]" if report.ok else "[red]FAIL[/]"
    table = Table(title=f"verify {report.family}: {verdict}", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    mismatch = "none" if report.first_mismatch is None else f"at new token {report.first_mismatch}"
    rows = {
        "greedy tokens": f"{report.batch} x {report.new_tokens} after {report.prompt_tokens}-token prompts",
        "same tokens as transformers": "yes" if report.tokens_equal else f"no ({mismatch})",
        "max |logit difference|": f"{report.max_abs_logit_err:.2e}",
        "relative logit error": f"{report.rel_logit_err:.2e} (pass < {LOGIT_REL_TOL:.0e})",
        "MoE requests served": str(report.moe_calls),
        "generation time": f"{report.reference_s:.2f}s transformers, {report.served_s:.2f}s served",
    }
    for key, value in rows.items():
        table.add_row(key, value)
    return table


HANDLERS = {"verify": cmd_verify}
