"""The Prometheus half of "Watching it" (README): a real Prometheus, set up as the README says,
scrapes the test session's Ray node and answers a query for one of the service's series.

Needs a `prometheus` binary on PATH (Debian/Ubuntu: `apt-get install prometheus`; `.ci/run`
installs it where it can); skipped, saying so, without one.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray

from cluster.control.metrics import exported_name
from tests.integration.support import MARKS, free_port, wait_until

PROMETHEUS = shutil.which("prometheus")

pytestmark = [*MARKS, pytest.mark.skipif(
    PROMETHEUS is None, reason="no `prometheus` binary on PATH (Debian/Ubuntu: apt-get install prometheus); "
                               "the README's Prometheus set-up is not checked here")]


def ray_targets() -> list[str]:
    """`host:port` of every live node's metrics endpoint: what Ray writes to its service
    discovery file (`prom_metrics_service_discovery.json`, from the dashboard, which this test
    session runs without), taken from the same node table."""
    return [f"{n['NodeManagerAddress']}:{n['MetricsExportPort']}" for n in ray.nodes() if n["Alive"]]


def prometheus_config(tmp: Path) -> Path:
    """A config like `ray metrics launch-prometheus`'s (`file_sd_configs` over Ray's discovery
    file format), scraping every second so the test is quick."""
    targets = tmp / "prom_metrics_service_discovery.json"
    targets.write_text(json.dumps([{"labels": {"job": "ray"}, "targets": ray_targets()}]))
    config = tmp / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n- job_name: ray\n  file_sd_configs:\n"
        f"  - files: ['{targets}']\n    refresh_interval: 1s\n"
    )
    return config


def _get_json(url: str) -> dict | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.loads(response.read())
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[str]:
    """A Prometheus on loopback scraping this session's Ray; yields its base URL."""
    port = free_port()
    log = tmp_path / "prometheus.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={prometheus_config(tmp_path)}", f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=out, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"prometheus exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as response:
                    return response.status == 200
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                return False

        wait_until(ready, 15, "prometheus to be ready", poll_s=0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def test_prometheus_scrapes_ray_and_answers_for_the_service(main_server, prometheus):
    series = exported_name("workers")  # ray_moe_serve_workers{model, state}
    query = f'{series}{{model="{main_server.name}",state="serving"}}'
    found: list[dict] = []

    def answered() -> bool:
        data = _get_json(f"{prometheus}/api/v1/query?{urllib.parse.urlencode({'query': query})}")
        found[:] = [] if data is None or data.get("status") != "success" else data["data"]["result"]
        return bool(found)

    wait_until(answered, 20, f"prometheus to have scraped {query}", poll_s=0.5)
    (sample,) = found
    assert sample["metric"]["job"] == "ray" and sample["metric"]["model"] == main_server.name
    assert float(sample["value"][1]) == main_server.deployment.placement.num_workers == 2
    targets = _get_json(f"{prometheus}/api/v1/targets")["data"]["activeTargets"]
    assert {t["health"] for t in targets} == {"up"}, targets
