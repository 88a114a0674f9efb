"""The README's tables from a `bench_serving` report: float32 against its baselines, and the
compact dtypes beside float32 with the bytes the workers hold."""

from bench.render import compact_table, serving_table


def _served(tokens_per_s: float, busy_ms: float, error: float | None = None) -> dict:
    served = {"tokens_per_s": tokens_per_s, "p50_ms": 800.0, "p99_ms": 870.0, "router_cpu_fraction": 0.015,
              "worker_busy_ms_per_request": busy_ms}
    return served if error is None else {**served, "max_rel_error": error}


REPORT = {"configs": {"h1024": {
    "held": {"float32": {"weight_bytes": 264 * 2**20}, "bfloat16": {"weight_bytes": 132 * 2**20}},
    "points": [{"tokens": 4096, "concurrency": 1, "served": _served(5000, 643, 0.0),
                "reference": {"tokens_per_s": 6667}, "naive": {"tokens_per_s": 6242},
                "served_vs_reference": 0.75, "served_vs_naive": 0.8}],
    "compact": {"bfloat16": [{"tokens": 4096, "concurrency": 1, "served": _served(9375, 268, 4.3e-3),
                              "served_vs_float32": 1.875}]},
}}}


def test_the_serving_table_has_a_row_per_float32_point() -> None:
    rows = serving_table(REPORT).splitlines()
    assert len(rows) == 3 and rows[2].startswith("| h1024 | 4096 | 1 | 6,667 | 5,000 | 6,242 | 0.75 | 0.80 |")


def test_the_compact_table_puts_each_dtype_beside_float32() -> None:
    rows = compact_table(REPORT).splitlines()[2:]
    assert rows == [
        "| h1024 | float32 | 264 MiB | 4096 | 1 | 5,000 | 1.00 | 643 ms | 0.0e+00 |",
        "| h1024 | bfloat16 | 132 MiB | 4096 | 1 | 9,375 | 1.88 | 268 ms | 4.3e-03 |",
    ]
