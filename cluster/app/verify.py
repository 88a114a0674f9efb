"""`moe-serve verify CHECKPOINT`: the whole model, end to end, against Hugging Face
`transformers`.

The checkpoint's own model runs in this process with `transformers`, once alone and once with
every MoE block replaced by a call to the served layer over gRPC (the router's gate, the expert
workers, the combine). Both generate greedily from the same prompts; the check passes when they
produce the same tokens and their logits on the same sequence agree to float32 precision.

Dense layers, attention, norms and the LM head stay in `transformers`: they are what the served
MoE layers are embedded in, not what is under test.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from cluster.model_spec import ModelSpec
from router_service.generation.dense_model import (
    MOE_BLOCK_NAMES,
    TUPLE_BLOCKS,
    causal_lm_class,
    decoder_layers,
    moe_block_name,
)

LOGIT_REL_TOL = 1e-4  # float32 sums in another order: ~1e-6; a wrong expert or weight: > 1e-2


@dataclass(frozen=True)
class VerifyReport:
    """reference_tokens / served_tokens: `[batch, new_tokens]` greedy continuations;
    first_mismatch: the first step where they differ (None: none); logits errors: served vs
    reference logits over the reference sequence (teacher-forced); moe_calls: requests the
    served blocks sent."""

    family: str
    batch: int
    prompt_tokens: int
    new_tokens: int
    reference_tokens: list[list[int]]
    served_tokens: list[list[int]]
    first_mismatch: int | None
    max_abs_logit_err: float
    rel_logit_err: float
    moe_calls: int
    reference_s: float
    served_s: float

    @property
    def tokens_equal(self) -> bool:
        return self.first_mismatch is None

    @property
    def ok(self) -> bool:
        return self.tokens_equal and self.rel_logit_err < LOGIT_REL_TOL

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "tokens_equal": self.tokens_equal, "ok": self.ok, "logit_rel_tol": LOGIT_REL_TOL}


def load_hf_model(checkpoint: str) -> torch.nn.Module:
    """The checkpoint's causal LM in float32, eval mode; a clear error without `transformers`."""
    try:
        import transformers
    except ImportError:
        raise SystemExit("moe-serve verify needs Hugging Face transformers: pip install 'transformers>=5.25,<6'") from None

    config = transformers.AutoConfig.from_pretrained(checkpoint)
    return causal_lm_class(config).from_pretrained(checkpoint, dtype=torch.float32).eval()


def moe_blocks(model: torch.nn.Module, spec: ModelSpec) -> dict[int, torch.nn.Module]:
    """`{layer: MoE block module}` of the decoder layers `spec` serves."""
    layers = decoder_layers(model)
    if len(layers) != spec.num_hidden_layers:
        raise ValueError(f"the model has {len(layers)} decoder layers, the served spec {spec.num_hidden_layers}")
    blocks = {}
    for layer in spec.moe_layers:
        name = moe_block_name(layers[layer])
        if name is None:
            raise ValueError(f"decoder layer {layer} has none of {MOE_BLOCK_NAMES}")
        blocks[layer] = getattr(layers[layer], name)
    return blocks


class ServedBlocks:
    """While entered, each MoE block of `model` forwards to the served layer: its input
    `[batch, seq, H]` goes out as one request of `batch * seq` tokens, and the answer comes back
    in its place. `calls` counts the requests."""

    def __init__(self, model: torch.nn.Module, spec: ModelSpec, client, model_name: str, timeout_s: float = 60.0):
        self._blocks = moe_blocks(model, spec)
        self._client, self._name, self._timeout_s = client, model_name, timeout_s
        self.calls = 0

    def _forward(self, layer: int):
        as_tuple = type(self._blocks[layer]).__name__ in TUPLE_BLOCKS  # (output, router scores): scores unused

        def forward(hidden_states: torch.Tensor):
            x = hidden_states.reshape(-1, hidden_states.shape[-1]).to(torch.float32).contiguous().numpy()
            answer = self._client.infer(self._name, x, layer=layer, timeout_s=self._timeout_s)
            self.calls += 1
            y = torch.from_numpy(np.ascontiguousarray(answer.hidden_states))
            y = y.reshape(hidden_states.shape).to(hidden_states.dtype)
            return (y, None) if as_tuple else y
        return forward

    def __enter__(self) -> ServedBlocks:
        for layer, block in self._blocks.items():
            block.forward = self._forward(layer)  # an instance attribute shadows the class's method
        return self

    def __exit__(self, *exc) -> None:
        for block in self._blocks.values():
            del block.forward


@contextmanager
def _timed(into: list[float]) -> Iterator[None]:
    start = time.perf_counter()
    yield
    into.append(time.perf_counter() - start)


def verify(model: torch.nn.Module, spec: ModelSpec, client, model_name: str, new_tokens: int = 16,
           prompt_tokens: int = 8, batch: int = 2, seed: int = 0) -> VerifyReport:
    """Greedy generation and logits of `model` alone vs through the served MoE layers."""
    if min(new_tokens, prompt_tokens, batch) < 1:
        raise ValueError(f"new_tokens, prompt_tokens and batch must be >= 1, got {new_tokens}, {prompt_tokens}, {batch}")
    vocab = model.config.vocab_size
    prompt = torch.randint(vocab, (batch, prompt_tokens), generator=torch.Generator().manual_seed(seed))
    options = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False,
               "attention_mask": torch.ones_like(prompt), "pad_token_id": 0}
    times: list[float] = []
    with torch.no_grad():
        with _timed(times):
            reference = model.generate(prompt, **options)
        want = model(reference).logits
        with ServedBlocks(model, spec, client, model_name) as served_blocks:
            with _timed(times):
                served = model.generate(prompt, **options)
            got = model(reference).logits
    ref_new, served_new = reference[:, prompt_tokens:], served[:, prompt_tokens:]
    differs = (ref_new != served_new).any(dim=0).nonzero()
    err = (got - want).abs()
    return VerifyReport(
        family=spec.family, batch=batch, prompt_tokens=prompt_tokens, new_tokens=new_tokens,
        reference_tokens=ref_new.tolist(), served_tokens=served_new.tolist(),
        first_mismatch=int(differs[0]) if differs.numel() else None,
        max_abs_logit_err=float(err.max()), rel_logit_err=float(err.max() / want.abs().max()),
        moe_calls=served_blocks.calls, reference_s=times[0], served_s=times[1],
    )


def verify_at(address: str, name: str, model: torch.nn.Module, spec: ModelSpec, credentials=None,
              **options) -> VerifyReport:
    """`verify` against the router at `address` serving model `name`, once it is ready and
    serves the same MoE layers as `spec` (ValueError otherwise)."""
    from router_service.client import MoEClient

    with MoEClient(address, credentials=credentials) as client:
        client.wait_ready(30)
        served = client.model_metadata(name, timeout_s=30).parameters
        if "moe_layers" in served and served["moe_layers"].string_param != spec.describe_layers():
            raise ValueError(f"model {name!r} at {address} serves MoE layers {served['moe_layers'].string_param}, "
                             f"the checkpoint has {spec.describe_layers()}: not the same model")
        return verify(model, spec, client, name, **options)


async def serve_and_verify(checkpoint: str, model: torch.nn.Module, spec: ModelSpec, workers: int = 2,
                           name: str = "moe", progress=None, compute_dtype: str = "float32",
                           **options) -> VerifyReport:
    """Serve `checkpoint` in this process (Ray connected), `verify_at` it, and stop serving.

    The experts are held as the checkpoint stores them (BF16, FP8, ...) and, by default, computed
    in float32 (`compute_dtype`), as the float32 `transformers` model computes: the check is then
    to float32 precision whatever the checkpoint's dtype. BF16 math would differ from it by BF16
    rounding, more than `LOGIT_REL_TOL`."""
    from cluster.app.launcher import deploy
    from cluster.config import ServeConfig

    config = ServeConfig().with_overrides(**{
        "model.checkpoint": os.path.abspath(checkpoint), "model.name": name, "router.port": 0, "workers.count": workers,
        "workers.compute_dtype": compute_dtype})
    deployment = await deploy(config, progress)
    try:
        return await asyncio.to_thread(verify_at, deployment.address, name, model, spec, **options)
    finally:
        await deployment.stop(grace_s=2.0)
