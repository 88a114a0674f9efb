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


RANDOM_MODELS = [p for p in DEPLOYMENTS if load_config(p).model.random_or_default is not None]


@pytest.mark.parametrize("path", RANDOM_MODELS, ids=lambda p: p.name)
def test_shipped_random_models_fit_their_slots(path):
    """(A checkpoint's expert count is known only once it is read; the service checks it then.)"""
    from cluster.placement import slots_per_worker

    config = load_config(path)
    spec = config.model.random_or_default.spec()
    # raises when the fewest workers cannot hold every expert
    slots_per_worker(spec.num_logical_experts, config.workers.bounds[0], config.workers.slots_per_worker,
                     config.rebalance.min_replicas)
