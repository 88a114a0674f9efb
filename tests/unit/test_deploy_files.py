"""Every deployment YAML we ship loads and validates (Ray cluster launcher files, `cluster-*.yaml`,
are checked by Ray's own validation in test_cluster_yamls.py)."""

from pathlib import Path

import pytest

from cluster.config import load_config

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
DEPLOYMENTS = sorted(p for p in DEPLOY.glob("*.yaml") if not p.name.startswith("cluster-"))


@pytest.mark.parametrize("path", DEPLOYMENTS, ids=lambda p: p.name)
def test_shipped_config_is_valid(path):
    config = load_config(path)
    assert config.model.name
    assert config.workers.count >= 1


def test_there_are_shipped_configs():
    assert len(DEPLOYMENTS) >= 2
