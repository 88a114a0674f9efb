"""Expert skipping (`router_service.skipping`): what each threshold drops, what it costs in
accuracy and what it buys in speed, on the served stack, for every tiny family.

    .venv/bin/python -m bench.bench_skip --out docs/expert_skipping.json --plot docs/expert_skipping.png
    .venv/bin/python -m bench.bench_skip --quick                      # smoke run, under a minute
    .venv/bin/python -m bench.bench_skip --from-json docs/expert_skipping.json --plot docs/expert_skipping.png

Per family of `workers.tiny_models.FAMILIES` (random seeded weights, float32, saved by
`transformers` with room for 256 new tokens), served in this process (router, dense side and
engine on a background event loop; 2 expert shard actors of 1 torch thread), and per threshold
(requests set `expert_skip_threshold`, the model's setting stays 0):

- skipped_fraction: expert-tokens skipped / expert-tokens routed before skipping, over the
  greedy generation below (prompts and new tokens);
- tokens_per_s: new tokens per second of that generation (the prompts at once, greedy, exactly
  `new_tokens` each);
- greedy_agreement: share of the new tokens equal, position by position, to threshold 0's;
  first_divergence: where the first different token comes (new_tokens when none);
- teacher-forced logits: each prompt followed by threshold 0's tokens, run once through the
  served MoE layers at the threshold: logit_max_abs_error, logit_max_rel_error (/ max |logit| at
  threshold 0) and top1_agreement (share of positions whose argmax is threshold 0's).

`layer` times the served MoE layer alone (the router's forward over the expert pool, no dense
side) on a larger random Mixtral-shaped layer, where expert math is most of the work: its
tokens/s per threshold (the median of rounds that take every threshold in turn) shows what
skipping buys when experts dominate. Its random gate is near-uniform, so 0..0.3 skips little
there; the full run also times 0.4 and 0.49 (for top-2: every second expert whose share is below
0.49, about half the expert-tokens) to show the speed of skipping as much as a trained gate
does at the papers' settings.

Tiny random models are not trained models: their gates are near-random and their greedy outputs
loop, so the agreement curves here are not what a trained checkpoint gives; the papers report
their curves on Mixtral-8x7B and similar (see the README).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import ray
import torch

from bench.bench_generate import machine, progress
from bench.bench_serving import ServedModel
from bench.render import emit
from cluster.app.launcher import connect_ray
from cluster.config import RayConfig, validate_config
from router_service.generation.attention import SeqSlots, StepLayout
from router_service.generation.kv_cache import PagedKVCache
from router_service.generation.params import SamplingParams
from workers.tiny_models import BY_NAME, FAMILIES, TinyFamily

NAMESPACE = "moe-serve-bench-skip"
BLOCK = 16


@dataclass(frozen=True)
class Settings:
    families: tuple[str, ...]
    thresholds: tuple[float, ...]
    prompts: tuple[str, ...]
    new_tokens: int
    layer_shape: dict
    layer_tokens: int
    layer_repeats: int
    layer_rounds: int
    layer_extra_thresholds: tuple[float, ...] = ()  # the layer alone also at these (up to all but the top one)


FULL = Settings(
    families=tuple(f.name for f in FAMILIES), thresholds=(0.0, 0.05, 0.1, 0.15, 0.2, 0.3),
    prompts=("the cat sat on", "a big red sun", "birds sing of rain", "where the sea is quiet"), new_tokens=256,
    layer_shape={"layers": 1, "experts": 8, "hidden": 1024, "ffn": 3584, "top_k": 2, "seed": 0},
    layer_tokens=512, layer_repeats=3, layer_rounds=5, layer_extra_thresholds=(0.4, 0.49))
QUICK = Settings(families=("mixtral", "deepseek-v3"), thresholds=(0.0, 0.1, 0.3), prompts=FULL.prompts[:2],
                 new_tokens=24, layer_shape={"layers": 1, "experts": 8, "hidden": 128, "ffn": 256, "top_k": 2,
                                             "seed": 0},
                 layer_tokens=64, layer_repeats=2, layer_rounds=1)


def with_positions(family: TinyFamily, positions: int) -> TinyFamily:
    """`family` with `max_position_embeddings` = `positions` (the tiny ones hold 64 tokens)."""
    def config(transformers):
        cfg = family.config(transformers)
        cfg.max_position_embeddings = positions
        return cfg
    return replace(family, config=config)


def serve_config(name: str, model: dict):
    return validate_config({
        "model": {"name": f"bench-skip-{name}", **model},
        "workers": {"count": 2, "torch_threads": 1, "num_cpus": 0.5},
        "router": {"port": 0, "http_port": None, "torch_threads": 2},
        "generation": {"kv_cache_mb": 64, "max_num_seqs": 8, "max_batch_tokens": 2048, "prefill_chunk_tokens": 512},
        "rebalance": {"enabled": False},
        "ray": {"namespace": NAMESPACE},
    }, source="bench_skip config")


# ---- measuring one family ------------------------------------------------------------------------------

async def _generate(text, prompt_ids: list[int], params: SamplingParams) -> list[int]:
    tokens = []
    async for out in text.generate(prompt_ids, params):
        tokens += out.token_ids
    return tokens


async def generate_all(text, prompts: list[list[int]], params: SamplingParams) -> tuple[list[list[int]], float]:
    """Every prompt at once; (new tokens per prompt, wall seconds)."""
    start = time.perf_counter()
    outs = await asyncio.gather(*(_generate(text, p, params) for p in prompts))
    return outs, time.perf_counter() - start


async def forced_logits(router, ids: list[int], threshold: float) -> torch.Tensor:
    """Logits `[len(ids), V]` of one teacher-forced pass of `ids` through the served model (its
    dense side, and the router's MoE layers over the expert pool at `threshold`), in a KV cache
    of its own (the engine's stays untouched)."""
    model = router.text.engine.model
    blocks = -(-len(ids) // BLOCK)
    cache = PagedKVCache(model.kv_shapes(), blocks, BLOCK, model.dtype, model.device)
    layout = StepLayout.build([SeqSlots(list(range(blocks)), 0, len(ids))], BLOCK)
    groups = np.zeros(len(ids), dtype=np.int64)
    thresholds = torch.full((len(ids),), threshold) if threshold > 0 else None

    async def moe(layer: int, hidden: torch.Tensor) -> torch.Tensor:
        out, failed, why = await router.moe(layer, hidden, groups, thresholds)
        if failed is not None:
            raise why
        return out

    hidden = await model.forward(torch.tensor(ids), layout, cache, moe)
    return model.logits(hidden).float().cpu()


def agreement(got: list[list[int]], want: list[list[int]]) -> tuple[float, float, int]:
    """(share of positions equal, mean index of the first difference, sequences identical)."""
    equal = [np.mean(np.equal(g, w)) for g, w in zip(got, want)]
    first = [next((i for i, (a, b) in enumerate(zip(g, w)) if a != b), len(w)) for g, w in zip(got, want)]
    return float(np.mean(equal)), float(np.mean(first)), sum(g == w for g, w in zip(got, want))


def bench_family(name: str, work: Settings, directory: Path) -> dict:
    family = with_positions(BY_NAME[name], max(64, 2 * work.new_tokens))
    path = directory / name
    family.save(path)
    served = ServedModel(serve_config(name, {"checkpoint": str(path)}))
    try:
        router = served.deployment.router
        text, spec = router.text, router.spec
        prompts = [text.prompt_ids(p) for p in work.prompts]
        greedy = SamplingParams(max_tokens=work.new_tokens, temperature=0, ignore_eos=True)
        served.call(generate_all(text, prompts, replace(greedy, max_tokens=4)))  # warm-up
        rows, base, base_logits = [], None, None
        for threshold in work.thresholds:
            skipped0, sent0 = int(router.skipped_expert_tokens.sum()), int(router.expert_tokens.sum())
            outs, wall_s = served.call(generate_all(text, prompts, replace(greedy, expert_skip_threshold=threshold)))
            skipped = int(router.skipped_expert_tokens.sum()) - skipped0
            sent = int(router.expert_tokens.sum()) - sent0
            base = outs if base is None else base
            logits = [served.call(forced_logits(router, p + b, threshold))[len(p) - 1:-1] for p, b in zip(prompts, base)]
            base_logits = logits if base_logits is None else base_logits
            err = max(float((lt - l0).abs().max()) for lt, l0 in zip(logits, base_logits))
            scale = max(float(l0.abs().max()) for l0 in base_logits)
            top1 = np.mean([float((lt.argmax(-1) == l0.argmax(-1)).float().mean()) for lt, l0 in zip(logits, base_logits)])
            share, first, identical = agreement(outs, base)
            rows.append({"threshold": threshold, "skipped_fraction": round(skipped / max(skipped + sent, 1), 4),
                         "skipped_expert_tokens": skipped, "sent_expert_tokens": sent,
                         "tokens_per_s": round(len(prompts) * work.new_tokens / wall_s, 1), "wall_s": round(wall_s, 3),
                         "greedy_agreement": round(share, 4), "first_divergence": round(first, 1),
                         "identical_sequences": identical, "top1_agreement": round(float(top1), 4),
                         "logit_max_abs_error": err, "logit_max_rel_error": err / scale})
            progress(f"{name} threshold {threshold}: skipped {rows[-1]['skipped_fraction']:.1%}, "
                     f"{rows[-1]['tokens_per_s']} tok/s, agreement {share:.1%}, logit rel err {err / scale:.2e}")
        return {"family": spec.family, "experts": spec.num_experts, "top_k": spec.top_k,
                "moe_layers": spec.num_moe_layers, "shared_experts": spec.num_shared_experts, "thresholds": rows}
    finally:
        served.stop()


def bench_layer(work: Settings) -> dict:
    """The served MoE layer alone on a random Mixtral-shaped layer: tokens/s per threshold, the
    median over `layer_rounds` rounds that each time every threshold once, in turn (a shared
    machine's noise then falls on every threshold alike)."""
    served = ServedModel(serve_config("layer", {"random": dict(work.layer_shape)}))
    try:
        router = served.deployment.router
        layer = router.spec.moe_layers[0]
        x = torch.from_numpy(np.random.default_rng(0).standard_normal(
            (work.layer_tokens, router.spec.hidden_size), dtype=np.float32))
        groups = np.zeros(work.layer_tokens, dtype=np.int64)

        async def timed(threshold: float) -> float:
            thresholds = torch.full((work.layer_tokens,), threshold) if threshold > 0 else None
            start = time.perf_counter()
            for _ in range(work.layer_repeats):
                await router.moe(layer, x, groups, thresholds)
            return time.perf_counter() - start

        served.call(timed(0.0))  # warm-up
        thresholds = work.thresholds + work.layer_extra_thresholds
        walls: dict[float, list[float]] = {t: [] for t in thresholds}
        skipped = dict.fromkeys(thresholds, 0)
        sent = dict.fromkeys(thresholds, 0)
        for _ in range(work.layer_rounds):
            for threshold in thresholds:
                skipped0, sent0 = int(router.skipped_expert_tokens.sum()), int(router.expert_tokens.sum())
                walls[threshold].append(served.call(timed(threshold)))
                skipped[threshold] += int(router.skipped_expert_tokens.sum()) - skipped0
                sent[threshold] += int(router.expert_tokens.sum()) - sent0
        rows = []
        for threshold in thresholds:
            wall_s = float(np.median(walls[threshold]))
            rows.append({"threshold": threshold,
                         "skipped_fraction": round(skipped[threshold] / max(skipped[threshold] + sent[threshold], 1), 4),
                         "tokens_per_s": round(work.layer_tokens * work.layer_repeats / wall_s, 1),
                         "wall_s_per_round": [round(w, 3) for w in walls[threshold]]})
        for row in rows:
            row["speedup"] = round(row["tokens_per_s"] / rows[0]["tokens_per_s"], 3)
        progress(f"layer: {[(r['threshold'], r['skipped_fraction'], r['speedup']) for r in rows]}")
        return {"shape": work.layer_shape, "tokens": work.layer_tokens, "repeats": work.layer_repeats,
                "rounds": work.layer_rounds, "thresholds": rows}
    finally:
        served.stop()


# ---- the picture ----------------------------------------------------------------------------------------

def plot(report: dict, png: str) -> None:
    """Four panels over the threshold, one line per family: skipped expert-tokens, greedy
    agreement, logit error, and tokens/s relative to threshold 0; the MoE layer alone (black) on
    the first and the last. The tiny families' tokens/s are drawn faint: their steps are
    overhead, not expert math, and vary by tens of percent from run to run on a shared machine."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    panels = [("skipped_fraction", "expert-tokens skipped (fraction of routed)", False),
              ("greedy_agreement", "greedy tokens equal to threshold 0's", False),
              ("logit_max_rel_error", "teacher-forced logits: max error / max |logit| (0 drawn at 1e-9)", True),
              ("speedup", "tokens/s vs threshold 0 (families faint: overhead-bound, noisy)", False)]
    colors = plt.get_cmap("tab20")
    layer = (report.get("layer") or {}).get("thresholds")
    for ax, (key, title, log) in zip(axes.flat, panels):
        for i, (name, result) in enumerate(report["families"].items()):
            rows = result["thresholds"]
            ys = [r["tokens_per_s"] / rows[0]["tokens_per_s"] for r in rows] if key == "speedup" else [r[key] for r in rows]
            if log:
                ys = [max(y, 1e-9) for y in ys]
            faint = key == "speedup"
            ax.plot([r["threshold"] for r in rows], ys, marker="o", markersize=3, color=colors(i % 20),
                    alpha=0.35 if faint else 0.9, linewidth=1 if faint else 1.5, label=name)
        if layer and key in ("skipped_fraction", "speedup"):
            ax.plot([r["threshold"] for r in layer], [r[key] for r in layer], color="black", marker="s", markersize=4,
                    linewidth=2.5, label=f"MoE layer alone (hidden {report['layer']['shape']['hidden']}, top-2)")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("expert_skip_threshold")
        ax.set_yscale("log" if log else "linear")
        ax.grid(alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=8, frameon=False)
    new = report["settings"]["new_tokens"]
    fig.suptitle(f"Expert skipping on tiny random models ({new} greedy tokens per prompt): the mechanism, "
                 f"not the accuracy of a trained checkpoint", fontsize=11)
    fig.tight_layout(rect=(0, 0.08, 1, 0.97))
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)


# ---- the run --------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="two families, three thresholds, 24 tokens: a smoke run")
    parser.add_argument("--families", help="comma-separated, from " + ",".join(f.name for f in FAMILIES))
    parser.add_argument("--out", help="also write the JSON here")
    parser.add_argument("--plot", help="draw the curves into this PNG")
    parser.add_argument("--from-json", help="no run: read this report (to --plot it)")
    parser.add_argument("--no-layer", action="store_true", help="leave out the MoE layer alone")
    args = parser.parse_args(argv)
    if args.from_json:
        import json

        if not args.plot:
            parser.error("--from-json only draws: give --plot PNG")
        with open(args.from_json) as f:
            plot(json.load(f), args.plot)
        return 0
    work = QUICK if args.quick else FULL
    if args.families:
        names = tuple(n.strip() for n in args.families.split(",") if n.strip())
        unknown = [n for n in names if n not in BY_NAME]
        if unknown or not names:
            parser.error(f"--families: unknown {unknown}; choose from {list(BY_NAME)}")
        work = replace(work, families=names)

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    progress("starting Ray")
    connect_ray(RayConfig(namespace=NAMESPACE), num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False)
    settings = {**asdict(work), "quick": args.quick, "workers": 2, "worker_torch_threads": 1,
                "router_torch_threads": 2, "measure": "in process: the engine's generate and the router's MoE call"}
    report = {"machine": machine(), "settings": settings, "families": {}, "failed": {}, "layer": None,
              "note": "tiny random models: near-random gates and looping greedy text; the curves show the "
                      "mechanism, not the accuracy a trained checkpoint keeps"}
    try:
        with tempfile.TemporaryDirectory(prefix="bench-skip-") as directory:
            for name in work.families:
                try:
                    report["families"][name] = bench_family(name, work, Path(directory))
                except Exception as err:  # one family that cannot be served does not lose the others
                    progress(f"{name}: FAILED {type(err).__name__}: {err}")
                    report["failed"][name] = f"{type(err).__name__}: {err}"[:500]
        if not args.no_layer:
            report["layer"] = bench_layer(work)
    finally:
        ray.shutdown()
    emit(report, args.out)
    if args.plot:
        plot(report, args.plot)
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
