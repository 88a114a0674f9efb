"""Unit tier: no Ray, no sockets, fast. Any attempt to start Ray fails the test loudly."""

from __future__ import annotations

import pytest
import ray


def _refuse_ray_init(*args, **kwargs):
    raise RuntimeError(
        "ray.init() called from a unit test; unit tests must not start Ray "
        "(move the test to tests/integration)"
    )


@pytest.fixture(autouse=True)
def _no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ray, "init", _refuse_ray_init)
