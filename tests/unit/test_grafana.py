"""The shipped Grafana dashboard is the generator's output, and every query names a metric the
service exports (and every exported metric is charted)."""

import json
import re
from pathlib import Path

from cluster.control.grafana import render
from cluster.control.metrics import METRICS, exported_name

SHIPPED = Path(__file__).resolve().parents[2] / "deploy" / "grafana-moe-serve.json"
SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum")}


def exported_series() -> set[str]:
    return {exported_name(name) + suffix for name, (kind, _, _) in METRICS.items() for suffix in SUFFIXES[kind]}


def queries(dashboard: dict) -> list[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    return exprs + [v["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]


def test_shipped_dashboard_is_current():
    assert SHIPPED.read_text() == render(), "regenerate: python -m cluster.control.grafana > deploy/grafana-moe-serve.json"


def test_every_query_names_an_exported_metric():
    dashboard = json.loads(SHIPPED.read_text())
    known = exported_series()
    for expr in queries(dashboard):
        names = re.findall(r"\bray_moe_serve_\w+", expr)
        assert names, f"query names no moe-serve metric: {expr}"
        unknown = [n for n in names if n not in known]
        assert not unknown, f"{unknown} in {expr!r} are not exported (see cluster/control/metrics.py)"


def test_every_exported_metric_is_charted():
    used = " ".join(queries(json.loads(SHIPPED.read_text())))
    missing = [name for name in METRICS if exported_name(name) not in used]
    assert not missing, f"metrics without a panel: {missing}"


def test_panels_have_unique_ids_and_a_datasource():
    panels = json.loads(SHIPPED.read_text())["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    assert all(p["datasource"]["uid"] == "${datasource}" and p["targets"] for p in panels)
