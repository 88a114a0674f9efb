"""`moe-serve status --png`: a valid PNG with the expected panels, from a status as the control
plane reports it."""

import numpy as np
import pytest
from matplotlib.image import imread

from cluster.app.status_picture import PANELS, write_status_png
from cluster.placement import Placement

LAYERS, E = [0, 1], 4


def status(history_points: int) -> dict:
    placement = Placement.round_robin(len(LAYERS) * E, 2, 5).to_dict()
    rng = np.random.default_rng(0)
    return {
        "model": "pic", "placement_version": 3, "placement": placement, "layers": LAYERS, "num_experts": E,
        "tokens_per_s": 1234.0, "window_s": 5.0, "balancedness": [0.9, 0.8],
        "workers": [{"index": 0, "tokens_per_s": 700.0, "busy_fraction": 0.4},
                    {"index": 1, "tokens_per_s": 500.0, "busy_fraction": 0.3}],
        "history": {
            "t_s": [1000.0 + i for i in range(history_points)],
            "tokens_per_s": rng.random((history_points, len(LAYERS), E)).tolist(),
            "versions": [0] * (history_points // 2) + [1] * (history_points - history_points // 2),
        },
    }


@pytest.mark.parametrize("points", [pytest.param(30, id="with-history"), pytest.param(0, id="no-history-yet")])
def test_status_png_is_valid_with_the_panels(tmp_path, points):
    path = tmp_path / "status.png"

    titles = write_status_png(status(points), path)

    # the worker panel says its window: the routed load's (the title's), not one look
    assert titles == [PANELS[0], PANELS[1], f"{PANELS[2]} over the last 5 s"]
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = imread(path)
    assert pixels.shape[0] > 500 and pixels.shape[1] > 800
    assert pixels.std() > 0.05  # something is drawn, not a blank canvas


def test_status_png_places_shared_experts_after_the_routed_ones(tmp_path, monkeypatch):
    """A model with 2 shared pieces per layer: the placement has L * (E + 2) logical experts,
    labelled `layer:s0`, while the load history stays routed `[L, E]`."""
    from matplotlib.figure import Figure

    data = status(10)
    data["num_shared_experts"] = 2
    data["placement"] = Placement.round_robin(len(LAYERS) * (E + 2), 2, 6).to_dict()
    labels: set[str] = set()
    save = Figure.savefig

    def capture(figure, *args, **kwargs):
        labels.update(t.get_text() for ax in figure.axes for t in ax.get_xticklabels())
        return save(figure, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", capture)
    write_status_png(data, tmp_path / "shared.png")
    assert {"0:s0", "0:s1", "1:s0", "1:3"} <= labels, labels
