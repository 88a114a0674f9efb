"""Every deployment YAML we ship loads and validates."""

from pathlib import Path

import pytest

from cluster.config import load_config

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


@pytest.mark.parametrize("path", sorted(DEPLOY.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_config_is_valid(path):
    config = load_config(path)
    assert config.model.name
    assert config.workers.count >= 1


def test_there_are_shipped_configs():
    assert len(list(DEPLOY.glob("*.yaml"))) >= 2
