"""A Hugging Face Mixtral checkpoint, served, equals Hugging Face's own MoE block on it.

Each case builds a tiny `MixtralForCausalLM`, saves it with `save_pretrained` (one file, sharded,
or bfloat16), serves the directory through `model.checkpoint`, and compares the served layer with
`model.model.layers[l].mlp` (the `MixtralSparseMoeBlock`) on the same hidden states.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.integration.support import FP32_REL_TOL, MARKS, Served, hidden_states, rel_err, serve_config

transformers = pytest.importorskip("transformers")

pytestmark = MARKS


@dataclass(frozen=True)
class Case:
    name: str
    experts: int
    seed: int
    dtype: torch.dtype = torch.float32
    max_shard_size: str | None = None


CASES = [
    Case("single-file", experts=8, seed=1),
    Case("sharded", experts=4, seed=2, max_shard_size="40KB"),
    Case("bf16", experts=8, seed=3, dtype=torch.bfloat16),
]


@dataclass
class HFServed:
    case: Case
    served: Served
    hf: torch.nn.Module  # MixtralForCausalLM, float32, eval mode
    path: Path


def _tiny_mixtral(case: Case):
    config = transformers.MixtralConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_local_experts=case.experts,
        num_experts_per_tok=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=32,
        max_position_embeddings=64, router_jitter_noise=0.0,
        initializer_range=0.1,  # larger than default: decisive routing, outputs well above roundoff
    )
    torch.manual_seed(case.seed)
    return transformers.MixtralForCausalLM(config).eval()


@pytest.fixture(scope="module", params=CASES, ids=lambda c: c.name)
def hf_served(request, deploy_served, tmp_path_factory) -> Iterator[HFServed]:
    case: Case = request.param
    model = _tiny_mixtral(case)
    path = tmp_path_factory.mktemp(f"mixtral-{case.name}")
    saved = model.to(case.dtype)
    if case.max_shard_size:
        saved.save_pretrained(path, max_shard_size=case.max_shard_size)
    else:
        saved.save_pretrained(path)
    # What the checkpoint holds, seen in float32 (bf16 -> fp32 is exact).
    model = saved.float().eval()

    start, stop = deploy_served
    # the workers hold the BF16 experts as BF16; float32 math on them equals the float32 model of
    # the same weights to float32 rounding (BF16 math, the `auto` default on a CPU with AMX, is
    # checked to BF16 precision in test_compact_weights.py)
    config = serve_config(f"it-hf-{case.name}", checkpoint=str(path), workers=2).with_overrides(
        **{"workers.compute_dtype": "float32"})
    served = start(config)
    yield HFServed(case, served, model, path)
    stop(served)


def test_checkpoint_is_written_as_the_case_says(hf_served: HFServed) -> None:
    """Guards the cases: sharded really is sharded, bf16 really is bf16."""
    case, path = hf_served.case, hf_served.path
    index = path / "model.safetensors.index.json"
    if case.max_shard_size:
        files = set(json.loads(index.read_text())["weight_map"].values())
        assert len(files) > 2, f"expected several shards, got {sorted(files)}"
    else:
        assert not index.exists() and (path / "model.safetensors").is_file()
    from safetensors import safe_open

    with safe_open(str(next(path.glob("*.safetensors"))), framework="pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"BF16" if case.dtype == torch.bfloat16 else "F32"}


def test_spec_read_from_the_checkpoint(hf_served: HFServed) -> None:
    spec, cfg = hf_served.served.spec, hf_served.hf.config
    assert (spec.hidden_size, spec.intermediate_size, spec.num_experts, spec.top_k, spec.moe_layers) == (
        cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts, cfg.num_experts_per_tok,
        tuple(range(cfg.num_hidden_layers)),
    )
    meta = hf_served.served.client.model_metadata(hf_served.served.name, timeout_s=10)
    assert list(meta.inputs[0].shape) == [-1, cfg.hidden_size]


@pytest.mark.parametrize("tokens", [1, 7, 300])
def test_served_layer_equals_hf_sparse_moe_block(hf_served: HFServed, tokens: int) -> None:
    served = hf_served.served
    for layer in served.spec.moe_layers:
        x = hidden_states(tokens, served.spec.hidden_size, seed=10 * layer + tokens)
        block = hf_served.hf.model.layers[layer].mlp
        assert type(block).__name__ == "MixtralSparseMoeBlock"
        with torch.no_grad():
            want = block(torch.from_numpy(x.copy())[None])[0]
            _, want_weights, want_ids = block.gate(torch.from_numpy(x.copy()))

        got = served.client.infer(served.name, x, layer=layer, topk=True, timeout_s=60)

        err = rel_err(got.hidden_states, want)
        assert err < FP32_REL_TOL, f"{hf_served.case.name} layer {layer}, {tokens} tokens: rel error {err:.2e}"
        np.testing.assert_array_equal(got.topk_ids, want_ids.numpy().astype(np.int32))
        np.testing.assert_allclose(got.topk_weights, want_weights.numpy(), rtol=1e-5, atol=1e-6)
