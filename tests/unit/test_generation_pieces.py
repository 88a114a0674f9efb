"""The pure pieces of generation: request parameters and their errors, sampling, the paged cache
and its layout, the varlen attention against plain causal attention, and detokenization with
stop strings (with a real tokenizer built offline)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from router_service.errors import InvalidRequest
from router_service.generation.attention import SeqSlots, StepLayout, paged_attention
from router_service.generation.detokenizer import Detokenizer
from router_service.generation.kv_cache import BlockAllocator, LayerShape, PagedKVCache
from router_service.generation.params import SamplingParams
from router_service.generation.sampling import sample
from workers.tiny_models import build_tokenizer

# ---- parameters -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        pytest.param({"max_tokens": 0}, "max_tokens must be >= 1, got 0", id="max-tokens-zero"),
        pytest.param({"max_tokens": "ten"}, "max_tokens must be an integer, got 'ten'", id="max-tokens-str"),
        pytest.param({"temperature": -0.5}, "temperature must be >= 0", id="negative-temperature"),
        pytest.param({"temperature": float("nan")}, "temperature must be a finite number", id="nan-temperature"),
        pytest.param({"top_p": 0.0}, "top_p must be in (0, 1], got 0.0", id="top-p-zero"),
        pytest.param({"top_p": 1.5}, "top_p must be in (0, 1], got 1.5", id="top-p-big"),
        pytest.param({"top_k": -2}, "top_k must be >= -1", id="top-k"),
        pytest.param({"logprobs": 6}, "logprobs must be in [0, 5], got 6", id="logprobs"),
        pytest.param({"stop": ("",)}, "stop must be a string or a list of non-empty strings", id="empty-stop"),
        pytest.param({"stop": ("a", "b", "c", "d", "e")}, "stop takes at most 4 strings", id="many-stops"),
        pytest.param({"seed": True}, "seed must be an integer", id="bool-seed"),
    ],
)
def test_bad_parameters_name_the_field(fields, message):
    with pytest.raises(InvalidRequest) as caught:
        SamplingParams(**fields)
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("prompt", "max_tokens", "message"),
    [
        pytest.param(0, 4, "the prompt is empty", id="empty"),
        pytest.param(64, 1, "the prompt has 64 tokens; this model's context is 64", id="too-long"),
        pytest.param(60, 10, "max_tokens (10) plus the prompt's 60 tokens exceed", id="no-room"),
    ],
)
def test_lengths_are_checked_against_the_context(prompt, max_tokens, message):
    with pytest.raises(InvalidRequest, match=message.replace("(", r"\(").replace(")", r"\)")):
        SamplingParams(max_tokens=max_tokens).check_length(prompt, 64)


# ---- sampling ----------------------------------------------------------------------------------


def test_greedy_takes_the_argmax_with_the_models_logprobs():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, -1.0]])

    picked = sample(logits, [SamplingParams(temperature=0, logprobs=2)] * 2, [None, None])

    assert picked.token_ids.tolist() == [1, 0]
    torch.testing.assert_close(picked.logprobs, torch.log_softmax(logits, -1).max(-1).values)
    assert picked.top_ids.tolist() == [[1, 2], [0, 1]]


def test_a_seeded_request_draws_the_same_whatever_its_batch():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=0.8, seed=7)
    alone = [sample(logits[2:3], [params], [torch.Generator().manual_seed(7)]).token_ids.item() for _ in range(1)]

    gens = [None, torch.Generator().manual_seed(1), torch.Generator().manual_seed(7), None]
    batched = sample(logits, [SamplingParams(temperature=1.0)] * 2 + [params, SamplingParams(temperature=0)], gens)

    assert batched.token_ids[2].item() == alone[0]
    assert batched.token_ids[3].item() == int(logits[3].argmax())


def test_top_k_and_top_p_only_ever_draw_what_they_keep():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    gen = torch.Generator().manual_seed(0)
    top_k = {sample(logits, [SamplingParams(top_k=2)], [gen]).token_ids.item() for _ in range(200)}
    # probabilities 0.64, 0.24, 0.09, ...: top_p 0.7 keeps the first two, 0.5 the first alone
    top_p = {sample(logits, [SamplingParams(top_p=0.7)], [gen]).token_ids.item() for _ in range(200)}
    top_p_small = {sample(logits, [SamplingParams(top_p=0.5)], [gen]).token_ids.item() for _ in range(50)}

    assert top_k == {0, 1} and top_p == {0, 1} and top_p_small == {0}


# ---- the cache and its layout ------------------------------------------------------------------


def test_blocks_are_handed_out_and_taken_back():
    blocks = BlockAllocator(4)
    first = blocks.allocate(3)

    assert first == [0, 1, 2] and blocks.free == 1 and blocks.used_fraction == 0.75
    with pytest.raises(ValueError, match="asked for 2 KV blocks with 1 free"):
        blocks.allocate(2)
    blocks.release(first)
    assert blocks.free == 4


def test_layout_maps_positions_to_the_sequences_blocks():
    layout = StepLayout.build([SeqSlots([5, 2], computed=3, new_tokens=2), SeqSlots([7], 0, 3)], block_size=4)

    assert layout.positions.tolist() == [3, 4, 0, 1, 2]
    assert layout.slot_mapping.tolist() == [5 * 4 + 3, 2 * 4 + 0, 28, 29, 30]
    assert layout.context_slots.tolist() == [20, 21, 22, 23, 8, 28, 29, 30]
    assert (layout.q_lens, layout.kv_lens) == ([2, 3], [5, 3])
    with pytest.raises(ValueError, match="holds only 1 blocks"):
        StepLayout.build([SeqSlots([0], 3, 2)], block_size=4)


def test_cache_sizes_itself_to_the_budget():
    shapes = {0: LayerShape(2, 8, 2, 8), 1: LayerShape(1, 16, 1, 4)}
    per_token = (2 * 8 + 2 * 8 + 16 + 4) * 4  # float32

    assert PagedKVCache.blocks_within(per_token * 16 * 10 + 5, shapes, 16, 4) == 10
    assert PagedKVCache(shapes, 10, 16).nbytes == per_token * 16 * 10


class _Module(torch.nn.Module):
    pass


def test_varlen_attention_equals_causal_attention_per_sequence():
    """Two sequences: one reads a prompt chunk after 3 cached tokens, two more decode; the result
    equals plain causal attention over each whole sequence (with grouped-query heads)."""
    gen = torch.Generator().manual_seed(0)
    lengths, new = [7, 5, 9, 4], [4, 5, 1, 1]  # the second reads its whole prompt at once
    heads, kv_heads, dim = 4, 2, 8
    qs = [torch.randn(heads, n, dim, generator=gen) for n in lengths]
    ks = [torch.randn(kv_heads, n, dim, generator=gen) for n in lengths]
    vs = [torch.randn(kv_heads, n, dim, generator=gen) for n in lengths]
    shape = LayerShape(kv_heads, dim, kv_heads, dim)
    cache = PagedKVCache({0: shape}, num_blocks=16, block_size=2)
    blocks = BlockAllocator(16)
    tables = [blocks.allocate(-(-n // 2)) for n in lengths]
    cached = [n - m for n, m in zip(lengths, new)]
    if any(cached):  # what earlier steps wrote
        earlier = cache.step(StepLayout.build([SeqSlots(t, 0, c) for t, c in zip(tables, cached) if c], 2))
        earlier.update(torch.cat([k[:, :c] for k, c in zip(ks, cached) if c], 1).unsqueeze(0),
                       torch.cat([v[:, :c] for v, c in zip(vs, cached) if c], 1).unsqueeze(0), 0)
    layout = StepLayout.build([SeqSlots(t, c, m) for t, c, m in zip(tables, cached, new)], 2)
    key, value = cache.step(layout).update(torch.cat([k[:, c:] for k, c in zip(ks, cached)], 1).unsqueeze(0),
                                           torch.cat([v[:, c:] for v, c in zip(vs, cached)], 1).unsqueeze(0), 0)
    query = torch.cat([q[:, c:] for q, c in zip(qs, cached)], 1).unsqueeze(0)

    out, _ = paged_attention(_Module(), query, key, value, None, scaling=0.3, moe_serve_layout=layout)

    want = [F.scaled_dot_product_attention(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), is_causal=True, scale=0.3,
                                           enable_gqa=True)[0, :, c:].transpose(0, 1)
            for q, k, v, c in zip(qs, ks, vs, cached)]
    torch.testing.assert_close(out[0], torch.cat(want), rtol=1e-5, atol=1e-6)


# ---- text out ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(48)


def _stream(tokenizer, text: str, stop=()):
    ids = tokenizer(text).input_ids
    detok = Detokenizer(tokenizer, tokenizer("the").input_ids, stop)
    pieces = [detok.add(t) for t in ids]
    return pieces, detok


def test_pieces_add_up_to_the_decoded_text(tokenizer):
    pieces, detok = _stream(tokenizer, " the cat sat on a mat")
    pieces.append(detok.flush())

    assert "".join(pieces) == " the cat sat on a mat" == detok.text


def test_a_stop_string_ends_the_text_before_it(tokenizer):
    pieces, detok = _stream(tokenizer, " the cat sat on a mat", stop=("sat",))

    assert detok.stopped and "".join(pieces) == " the cat "
    assert detok.add(5) == "", "nothing after a stop"


def test_text_that_may_start_a_stop_string_is_held_back(tokenizer):
    detok = Detokenizer(tokenizer, tokenizer("the").input_ids, stop=("cat!",))
    shown = "".join(detok.add(t) for t in tokenizer(" the cat").input_ids)

    assert shown == " the " and detok.flush() == "cat"
