"""Expert skipping through the OpenAI-compatible HTTP API and the generation engine, without
Ray: a tiny Mixtral checkpoint served in process (`tests/unit/text_server.py`), its MoE layers
run by the checkpoint's own `transformers` blocks behind a hook that records the per-token
thresholds each MoE call gets. The model's setting applies to requests that set none, a
request's own value (0 included) overrides it, sequences batched together keep their own, and
a bad value is a 400 naming the field."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch

from router_service.generation.engine import EngineSettings
from router_service.generation.text import build_text_model
from router_service.openai_http import HttpServer, start_http_server
from tests.unit.text_server import KV_CACHE_BYTES, LoopThread, TextRouter, fetch

transformers = pytest.importorskip("transformers")

MODEL_THRESHOLD = 0.2


class RecordingMoE:
    """The checkpoint's MoE blocks as the engine's `MoECall`, keeping each call's
    (groups, thresholds or None)."""

    def __init__(self, hf_model: torch.nn.Module):
        self._hf = hf_model
        self.calls: list[tuple[list[int], list[float] | None]] = []

    async def __call__(self, layer: int, hidden: torch.Tensor, groups, thresholds=None):
        self.calls.append((groups.tolist(), None if thresholds is None else thresholds.tolist()))
        with torch.no_grad():
            return self._hf.model.layers[layer].mlp(hidden.float().unsqueeze(0))[0], None, None

    def take(self) -> list[tuple[list[int], list[float] | None]]:
        calls, self.calls = self.calls, []
        return calls


@dataclass
class Setup:
    loop: LoopThread
    server: HttpServer
    url: str
    moe: RecordingMoE

    def complete(self, **body):
        return self.loop.run(fetch(f"{self.url}/v1/completions", body={"model": "tiny", "max_tokens": 3,
                                                                       "temperature": 0, **body}))


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Iterator[Setup]:
    from workers.hf_checkpoint import HFCheckpoint
    from workers.tiny_models import BY_NAME

    path = tmp_path_factory.mktemp("tiny-mixtral")
    hf = BY_NAME["mixtral"].save(path)
    checkpoint = HFCheckpoint(path)
    moe = RecordingMoE(hf)
    settings = EngineSettings(kv_cache_bytes=KV_CACHE_BYTES, block_size=16, max_num_seqs=8, max_batch_tokens=256,
                              prefill_chunk_tokens=64, max_waiting=16)
    text = build_text_model("tiny", path, checkpoint.dense_tensors(), checkpoint.spec.moe_layers, moe, settings,
                            device="cpu", expert_skip_threshold=MODEL_THRESHOLD)
    loop = LoopThread()
    server = loop.run(start_http_server({"tiny": TextRouter("tiny", text)}, "127.0.0.1", 0))
    loop.run(server.set_serving(True))
    yield Setup(loop, server, f"http://127.0.0.1:{server.port}", moe)
    loop.run(server.stop(1.0))
    loop.run(text.close())
    loop.close()


def test_a_request_without_a_threshold_gets_the_models(setup: Setup) -> None:
    setup.moe.take()
    answer = setup.complete(prompt="the cat sat")
    assert answer.status == 200, answer.body
    calls = setup.moe.take()
    assert calls and all(t is not None and t == pytest.approx([MODEL_THRESHOLD] * len(g)) for g, t in calls), calls


@pytest.mark.parametrize("value", [0.05, 0.35])
def test_a_requests_own_threshold_overrides_the_models(setup: Setup, value: float) -> None:
    setup.moe.take()
    assert setup.complete(prompt="the cat sat", expert_skip_threshold=value).status == 200
    calls = setup.moe.take()
    assert calls and all(t == pytest.approx([value] * len(g)) for g, t in calls), calls


def test_a_request_that_asks_for_zero_skips_nothing_whatever_the_model_says(setup: Setup) -> None:
    setup.moe.take()
    assert setup.complete(prompt="the cat sat", expert_skip_threshold=0).status == 200
    calls = setup.moe.take()
    assert calls and all(t is None for _, t in calls), calls  # the MoE call gets no thresholds at all


def test_sequences_batched_together_keep_their_own_thresholds(setup: Setup) -> None:
    setup.moe.take()
    answer = setup.loop.run(_both(setup))
    assert [a.status for a in answer] == [200, 200]
    mixed = [(g, t) for g, t in setup.moe.take() if t is not None and len(set(g)) == 2]
    assert mixed, "the two requests never shared a step"
    for groups, thresholds in mixed:
        values = {g: {round(v, 6) for v, gg in zip(thresholds, groups) if gg == g} for g in set(groups)}
        assert sorted(v for vs in values.values() for v in vs) == [0.0, 0.3], values  # one value per sequence


async def _both(setup: Setup):
    import asyncio

    body = {"model": "tiny", "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    return await asyncio.gather(fetch(f"{setup.url}/v1/completions", body={**body, "prompt": "a big red sun",
                                                                           "expert_skip_threshold": 0.3}),
                                fetch(f"{setup.url}/v1/completions", body={**body, "prompt": "the moon rose",
                                                                           "expert_skip_threshold": 0.0}))


@pytest.mark.parametrize(("value", "says"), [
    pytest.param(1.0, "expert_skip_threshold must be in [0, 1)", id="one"),
    pytest.param(-0.1, "expert_skip_threshold must be in [0, 1)", id="negative"),
    pytest.param("0.1", "expert_skip_threshold: input should be a valid number", id="string"),
    pytest.param([0.1], "expert_skip_threshold: input should be a valid number", id="list"),
])
def test_a_bad_threshold_is_400_naming_the_field(setup: Setup, value, says: str) -> None:
    for endpoint, body in (("completions", {"prompt": "x"}),
                           ("chat/completions", {"messages": [{"role": "user", "content": "x"}]})):
        answer = setup.loop.run(fetch(f"{setup.url}/v1/{endpoint}",
                                      body={"model": "tiny", "expert_skip_threshold": value, **body}))
        assert answer.status == 400, (endpoint, answer.body)
        assert answer.error["param"] == "expert_skip_threshold" and says in answer.error["message"], answer.error
