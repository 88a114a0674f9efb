"""The Grafana dashboard for the service's metrics, built from `cluster.control.metrics.METRICS`.

    python -m cluster.control.grafana > deploy/grafana-moe-serve.json

Import the file into the Grafana that Ray's Prometheus/Grafana integration sets up (Ray's
`metrics/grafana` provisioning, or Dashboards -> Import); pick the Prometheus data source and
the model. `tests/unit/test_grafana.py` checks the shipped file is this output and that every
query names an exported metric.
"""

from __future__ import annotations

import json
import sys

from cluster.control.metrics import METRICS, exported_name

SELECT = '{model=~"$model"}'
PANEL_W, PANEL_H = 12, 8


def series(name: str, suffix: str = "") -> str:
    """The Prometheus series of a metric: counters end in `_total`, histograms in `_bucket`..."""
    kind = METRICS[name][0]
    if kind == "counter":
        suffix = "_total"
    return exported_name(name) + suffix


def _panel(title: str, exprs: list[tuple[str, str]], unit: str = "short", kind: str = "timeseries",
           description: str = "") -> dict:
    return {
        "type": kind, "title": title, "description": description,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": [{"expr": expr, "legendFormat": legend, "refId": chr(ord("A") + i)}
                    for i, (expr, legend) in enumerate(exprs)],
    }


def _rate(name: str, by: str = "", window: str = "1m", extra: str = "") -> str:
    selector = SELECT if not extra else '{model=~"$model",' + extra + "}"
    grouping = f" by ({by})" if by else ""
    return f"sum{grouping} (rate({series(name)}{selector}[{window}]))"


def _quantile(q: float, name: str, by: str = "") -> str:
    group = "le" + (f", {by}" if by else "")
    return f"histogram_quantile({q}, sum by ({group}) (rate({series(name, '_bucket')}{SELECT}[5m])))"


def _gauge(name: str, by: str) -> str:
    return f"max by ({by}) ({series(name)}{SELECT})"


def panels() -> list[dict]:
    rows = [
        _panel("requests/s by gRPC status", [(_rate("requests", "code"), "{{code}}")], "reqps"),
        _panel("errors/s by gRPC status", [(_rate("requests", "code", "5m", 'code!="OK"'), "{{code}}")], "reqps"),
        _panel("request latency", [(_quantile(q, "request_latency_s"), f"p{int(q * 100)}") for q in (0.5, 0.9, 0.99)], "s"),
        _panel("tokens/s served", [(_rate("tokens", "model"), "{{model}}")], "short"),
        _panel("balancedness per MoE layer (mean / max worker load)", [(_gauge("balancedness", "layer"), "layer {{layer}}")],
               "percentunit"),
        _panel("expert load (expert-tokens/s)", [(_gauge("expert_tokens_per_s", "layer, expert"), "{{layer}}:{{expert}}")],
               "short", "heatmap", "per (layer, expert) for models up to monitoring.expert_series logical experts"),
        _panel("expert-tokens skipped/s per MoE layer", [(_rate("skipped_expert_tokens", "layer"), "layer {{layer}}")],
               description="expert skipping (model.expert_skip_threshold, or a request's expert_skip_threshold): "
                           "assignments dropped, never sent to a worker; the expert load beside them counts what was sent"),
        _panel("replicas per expert", [(_gauge("expert_replicas", "layer, expert"), "{{layer}}:{{expert}}")]),
        _panel("hottest experts (by rank)", [(_gauge("hot_expert_tokens_per_s", "rank"), "rank {{rank}}"),
                                             (_gauge("hot_expert_id", "rank"), "expert id at rank {{rank}}")],
               description="for models beyond monitoring.expert_series logical experts"),
        _panel("hottest experts: replicas", [(_gauge("hot_expert_replicas", "rank"), "rank {{rank}}")]),
        _panel("tokens/s per worker", [(_gauge("worker_tokens_per_s", "worker"), "worker {{worker}}")]),
        _panel("busy fraction per worker", [(_gauge("worker_busy_fraction", "worker"), "worker {{worker}}")], "percentunit"),
        _panel("queue depth", [(_gauge("worker_queue_tokens", "worker"), "worker {{worker}}"),
                               (_gauge("queue_tokens", "model"), "router queue")]),
        _panel("workers", [(_gauge("workers", "state"), "{{state}}"), (_gauge("placement_version", "model"), "placement version")]),
        _panel("workers per router: routable vs serving", [(_gauge("router_workers", "router, state"),
                                                              "{{router}} {{state}}")],
               description="under load every routable worker should be serving; a gap is a worker the router forgot"),
        _panel("rebalances", [(f"sum by (kind) (increase({series('rebalances')}{SELECT}[5m]))", "{{kind}}"),
                              (_rate("rebalance_bytes", "model", "5m"), "bytes moved/s")]),
        _panel("rebalance duration", [(_quantile(0.9, "rebalance_duration_s"), "p90")], "s"),
        _panel("scaling events", [(f"sum by (action, trigger) (increase({series('scale_events')}{SELECT}[15m]))",
                                   "{{action}} ({{trigger}})"),
                                  (_quantile(0.9, "scale_duration_s", "action"), "p90 s {{action}}")]),
        _panel("worker faults", [(f"sum by (kind) (increase({series('worker_events')}{SELECT}[15m]))", "{{kind}}")],
               description="workers lost (and routed around), reloaded after Ray restarted them, placement repairs"),
        _panel("time to first token", [(_quantile(q, "time_to_first_token_s"), f"p{int(q * 100)}") for q in (0.5, 0.9, 0.99)],
               "s", description="text generation: from a request's arrival to its first token"),
        _panel("time per output token", [(_quantile(q, "time_per_output_token_s"), f"p{int(q * 100)}")
                                         for q in (0.5, 0.9, 0.99)], "s"),
        _panel("generation end-to-end latency", [(_quantile(q, "e2e_request_latency_s"), f"p{int(q * 100)}")
                                                 for q in (0.5, 0.9, 0.99)], "s"),
        _panel("generation tokens/s", [(_rate("generation_tokens", "model"), "generated {{model}}"),
                                       (_rate("prompt_tokens", "model"), "prompt {{model}}")]),
        _panel("generation requests/s by finish reason", [(_rate("generation_requests", "reason"), "{{reason}}")], "reqps"),
        _panel("sequences running and waiting", [(_gauge("requests_running", "router"), "running {{router}}"),
                                                 (_gauge("requests_waiting", "router"), "waiting {{router}}")],
               description="per router (several routers over one expert pool are data-parallel attention)"),
        _panel("KV cache usage", [(_gauge("kv_cache_usage", "router"), "{{router}}")], "percentunit"),
    ]
    for i, panel in enumerate(rows):
        panel["id"] = i + 1
        panel["gridPos"] = {"x": (i % 2) * PANEL_W, "y": (i // 2) * PANEL_H, "w": PANEL_W, "h": PANEL_H}
    return rows


def dashboard() -> dict:
    return {
        "title": "moe-serve", "uid": "moe-serve", "schemaVersion": 39, "version": 1,
        "description": "Expert-parallel MoE serving: requests, latency, per-expert load, workers, rebalancing, scaling",
        "time": {"from": "now-30m", "to": "now"}, "refresh": "10s", "tags": ["moe-serve", "ray"],
        "templating": {"list": [
            {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "data source"},
            {"name": "model", "type": "query", "label": "model", "includeAll": True, "multi": True,
             "datasource": {"type": "prometheus", "uid": "${datasource}"},
             "query": f"label_values({series('workers')}, model)", "refresh": 2},
        ]},
        "panels": panels(),
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
