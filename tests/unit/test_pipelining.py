"""Pipelined micro-batches (`generation.pipeline_microbatches`): a step's batch is cut in two
micro-batches of whole sequences that are in flight at once, so one runs its attention while the
other is at the experts; the tokens are the same as without, and the split is a pure decision."""

from __future__ import annotations

import asyncio

import pytest
import torch

from router_service.generation.params import SamplingParams
from router_service.generation.scheduler import Scheduled, split_microbatches
from tests.unit.text_server import LocalMoE, LoopThread, text_model


def _items(*tokens: int) -> list[Scheduled]:
    return [Scheduled(i, n, 0, True) for i, n in enumerate(tokens)]


@pytest.mark.parametrize("tokens, parts, expected", [
    pytest.param((1, 1, 1, 1), 2, [[1, 1], [1, 1]], id="even-decodes"),
    pytest.param((1, 1, 1), 2, [[1, 1], [1]], id="odd-decodes"),
    pytest.param((100, 1, 1, 1), 2, [[100], [1, 1, 1]], id="a-prefill-alone"),
    pytest.param((1, 1, 1, 100), 2, [[1, 1, 1], [100]], id="a-prefill-last"),
    pytest.param((10, 10, 10, 1), 2, [[10, 10], [10, 1]], id="by-tokens"),
    pytest.param((5,), 2, [[5]], id="one-sequence-is-not-split"),
    pytest.param((3, 3), 4, [[3], [3]], id="no-more-parts-than-sequences"),
    pytest.param((1, 1, 1, 1, 1, 1), 3, [[1, 1], [1, 1], [1, 1]], id="three"),
    pytest.param((1, 2, 3), 1, [[1, 2, 3]], id="off"),
])
def test_split_keeps_batch_order_whole_sequences_and_even_tokens(tokens, parts, expected):
    out = split_microbatches(_items(*tokens), parts)

    assert [[s.tokens for s in part] for part in out] == expected
    assert [s.seq_id for part in out for s in part] == list(range(len(tokens)))


def test_split_refuses_zero_parts_and_gives_nothing_for_nothing():
    with pytest.raises(ValueError, match="parts must be >= 1"):
        split_microbatches(_items(1), 0)
    assert split_microbatches([], 2) == []


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    import transformers

    from workers.hf_checkpoint import HFCheckpoint
    from workers.tiny_models import BY_NAME

    path = tmp_path_factory.mktemp("tiny-mixtral")
    BY_NAME["mixtral"].save(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    checkpoint = HFCheckpoint(path)
    return path, hf, checkpoint.dense_tensors(), checkpoint.spec.moe_layers


def _run(mixtral, pipeline: bool, prompts: list[list[int]]) -> tuple[list[list[int]], LocalMoE]:
    path, hf, tensors, layers = mixtral
    loop, moe = LoopThread(), LocalMoE(hf)
    moe.delay_s = 0.002
    text = text_model("tiny", path, tensors, layers, moe, pipeline=pipeline)

    async def one(ids):
        stream = text.generate(ids, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
        return [t for out in [o async for o in stream] for t in out.token_ids]

    async def all_at_once():
        return await asyncio.gather(*(one(p) for p in prompts))

    try:
        return loop.run(all_at_once()), moe
    finally:
        loop.run(text.close())
        loop.close()


def test_pipelined_generation_gives_the_same_tokens_with_both_halves_in_flight(mixtral):
    prompts = [torch.randint(3, 40, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 9, 4, 7)]

    plain, plain_moe = _run(mixtral, False, prompts)
    piped, piped_moe = _run(mixtral, True, prompts)

    assert piped == plain and all(len(t) == 6 for t in piped)
    # off: one call per layer at a time; on: a second micro-batch's call starts while the first
    # one's is still at the experts (it ran its attention meanwhile)
    def overlapped(log):
        inflight, most = 0, 0
        for kind, _, _ in log:
            inflight += 1 if kind == "start" else -1
            most = max(most, inflight)
        return most

    assert overlapped(plain_moe.log) == 1
    assert overlapped(piped_moe.log) == 2
    assert piped_moe.calls > plain_moe.calls  # two micro-batches per step while 2+ sequences run
