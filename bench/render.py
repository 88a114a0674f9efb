"""Benchmark output: JSON reports, and the README's markdown tables from a `bench_serving` file
(float32 against the reference and the naive baseline; the compact dtypes against float32).

    .venv/bin/python -m bench.render bench/results/serving.json
"""

from __future__ import annotations

import json
import sys


def emit(report: dict, out: str | None) -> None:
    """Print a benchmark's JSON report, and write it to `out` too when given."""
    text = json.dumps(report, indent=2)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text)


def serving_table(report: dict) -> str:
    lines = [
        "| model | tokens/request | concurrency | reference tok/s | served tok/s | naive tok/s | served / reference | served / naive | served p50 / p99 ms | router CPU share |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, config in report["configs"].items():
        for p in config["points"]:
            s = p["served"]
            lines.append(
                f"| {name} | {p['tokens']} | {p['concurrency']} | {p['reference']['tokens_per_s']:,.0f} | "
                f"{s['tokens_per_s']:,.0f} | {p['naive']['tokens_per_s']:,.0f} | {p['served_vs_reference']:.2f} | "
                f"{p['served_vs_naive']:.2f} | {s['p50_ms']:,.0f} / {s['p99_ms']:,.0f} | {s['router_cpu_fraction']:.1%} |"
            )
    return "\n".join(lines)


def compact_table(report: dict) -> str:
    """The BF16 / FP8 rows beside float32 (`--dtypes`), one per dtype and point."""
    lines = [
        "| model | experts | held by the workers | tokens/request | concurrency | served tok/s | vs float32 | worker compute per request | max rel. error vs float32 math |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, config in report["configs"].items():
        rows = [("float32", p["tokens"], p["concurrency"], p["served"], 1.0) for p in config.get("points", [])]
        rows += [(dtype, p["tokens"], p["concurrency"], p["served"], p.get("served_vs_float32"))
                 for dtype, points in config.get("compact", {}).items() for p in points]
        for dtype, tokens, concurrency, s, ratio in rows:
            held = config.get("held", {}).get(dtype, {}).get("weight_bytes")
            error = s.get("max_rel_error")
            lines.append(
                f"| {name} | {dtype} | {'' if held is None else f'{held / 2**20:,.0f} MiB'} | {tokens} | {concurrency} | "
                f"{s['tokens_per_s']:,.0f} | {'' if ratio is None else f'{ratio:.2f}'} | "
                f"{s['worker_busy_ms_per_request']:,.0f} ms | {'' if error is None else f'{error:.1e}'} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        report = json.load(f)
    print(serving_table(report) if any(c.get("points") for c in report["configs"].values()) else "")
    if any(c.get("compact") for c in report["configs"].values()):
        print()
        print(compact_table(report))
