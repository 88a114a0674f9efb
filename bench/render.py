"""Benchmark output: JSON reports, and the README's markdown table from a `bench_serving` file.

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


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        print(serving_table(json.load(f)))
