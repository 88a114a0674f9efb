"""The dense part of a checkpoint's causal LM, as `transformers` builds it, with its MoE blocks cut
out: embeddings, every decoder layer's attention and norms, the dense MLP layers, the final norm
and the LM head. The expert weights are never built or loaded here.

The model is made on the meta device from the checkpoint's config; each MoE block is replaced by
a `MoEHole` (no weights); then only the dense tensors are loaded. A step runs the family's own
decoder layers in turn: an MoE layer's forward adds the hole's zeros, and its MoE output (gate,
experts, combine: the expert pool's work, `moe`) is added to the residual stream after it, which
is exactly where the layer would have added it.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Mapping, Sequence

import torch

from cluster import model_spec
from router_service.generation import attention
from router_service.generation.attention import LAYOUT_KWARG, StepLayout
from router_service.generation.kv_cache import LayerShape, ShapeProbe

# a decoder layer's MoE block, as transformers names it (Llama 4 `feed_forward`, DBRX `ffn`)
MOE_BLOCK_NAMES = ("mlp", "block_sparse_moe", "feed_forward", "ffn")
# MoE blocks whose forward returns `(output, router scores or logits)`, not the output alone
TUPLE_BLOCKS = ("GptOssMLP", "Llama4TextMoe")


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layers of a causal LM: `model.layers`, DBRX's `transformer.blocks`."""
    inner = getattr(model, "model", None) or getattr(model, "transformer", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        layers = getattr(inner, "blocks", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no decoder layers at model.layers or transformer.blocks")
    return layers


def causal_lm_class(config) -> type:
    """`cluster.model_spec.causal_lm_class`, refusing as a `DenseWeightsError`."""
    try:
        return model_spec.causal_lm_class(config)
    except ValueError as err:
        raise DenseWeightsError(str(err)) from None


def moe_block_name(decoder: torch.nn.Module) -> str | None:
    """The attribute of `decoder` that holds its MoE block, or None."""
    return next((n for n in MOE_BLOCK_NAMES if hasattr(decoder, n)), None)
MoEFn = Callable[[int, torch.Tensor], Awaitable[torch.Tensor]]  # (layer, [N, H]) -> [N, H]


class DenseWeightsError(ValueError):
    """The dense tensors do not fit the model the config describes; the message names them."""


class MoEHole(torch.nn.Module):
    """Stands where an MoE block was: keeps its input for the expert pool, adds nothing (as
    `(zeros, None)` where the block returned `(output, router scores)`: gpt-oss, Llama 4)."""

    def __init__(self, as_tuple: bool = False):
        super().__init__()
        self.taken: torch.Tensor | None = None
        self.as_tuple = as_tuple

    def forward(self, hidden_states: torch.Tensor):
        self.taken = hidden_states
        zeros = torch.zeros_like(hidden_states)
        return (zeros, None) if self.as_tuple else zeros


def unsupported_attention(config) -> str | None:
    """What the paged attention cannot do for this config, or None: Llama 4's attention
    temperature tuning on its no-RoPE layers computes positions from the cache's length, which a
    flat batch of many sequences does not have."""
    no_rope = [i for i, use in enumerate(getattr(config, "no_rope_layers", None) or []) if not use]
    if getattr(config, "attn_temperature_tuning", False) and no_rope:
        return (f"Llama 4 attention temperature tuning (attn_temperature_tuning) on its no-RoPE layers {no_rope} "
                f"is not supported by the paged attention")
    return None


class DenseModel:
    """config: the checkpoint's `transformers` config; tensors: its dense tensors by checkpoint
    key (everything but the MoE blocks of `moe_layers`); device and dtype: where and how the
    dense math runs."""

    def __init__(self, config, tensors: Mapping[str, torch.Tensor], moe_layers: Sequence[int],
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        attention.register()
        missing = unsupported_attention(config)
        if missing:
            raise DenseWeightsError(f"{missing}: this model serves MoE layers only, not generation")
        config._attn_implementation = attention.IMPLEMENTATION
        self.config, self.device, self.dtype = config, torch.device(device), dtype
        self.moe_layers = tuple(moe_layers)
        with torch.device("meta"):
            model = causal_lm_class(config)(config)
        inner = getattr(model, "model", None) or model.transformer  # DBRX: transformer.{wte, blocks, norm_f}
        self.layers = decoder_layers(model)
        self.holes: dict[int, MoEHole] = {}
        for layer in self.moe_layers:
            decoder = self.layers[layer]
            name = moe_block_name(decoder)
            if name is None:
                raise DenseWeightsError(f"decoder layer {layer} has no MoE block named {' or '.join(MOE_BLOCK_NAMES)}")
            self.holes[layer] = MoEHole(type(getattr(decoder, name)).__name__ in TUPLE_BLOCKS)
            setattr(decoder, name, self.holes[layer])
        _load(model, tensors, dtype, self.device)
        inner.rotary_emb = type(inner.rotary_emb)(config=config).to(self.device)
        self.embed = getattr(inner, "embed_tokens", None) or inner.wte
        self.norm = getattr(inner, "norm", None) or inner.norm_f
        self.rotary_emb = inner.rotary_emb
        self.model = model.eval()
        self._cache_kwarg = _cache_kwarg(type(self.layers[0]))

    def __repr__(self) -> str:
        return (f"DenseModel({type(self.model).__name__}, layers={len(self.layers)}, "
                f"moe_layers={list(self.moe_layers)}, device={self.device})")

    @property
    def vocab_size(self) -> int:
        return int(self.model.lm_head.out_features)

    @property
    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def kv_shapes(self) -> dict[int, LayerShape]:
        """What each layer's attention stores per token (one probing pass over one token)."""
        probe = ShapeProbe()
        layout = StepLayout(torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64),
                            torch.zeros(1, dtype=torch.int64), [1], [1])
        with torch.inference_mode():
            positions = layout.positions.unsqueeze(0).to(self.device)
            hidden = self.embed(torch.zeros(1, 1, dtype=torch.int64, device=self.device))
            embeddings = self.rotary_emb(hidden, positions)
            for decoder in self.layers:
                hidden = decoder(hidden, position_embeddings=embeddings, position_ids=positions,
                                 **{self._cache_kwarg: probe}, **{LAYOUT_KWARG: layout})
        return probe.shapes

    async def forward(self, input_ids: torch.Tensor, layout: StepLayout, cache, moe: MoEFn) -> torch.Tensor:
        """input_ids: `[N]` the step's new tokens (sequences one after another, as `layout`
        says) -> `[N, H]` hidden states after the final norm, keys and values stored in `cache`
        (a `PagedKVCache`; passes over disjoint sequences may run at once);
        `moe(layer, x)` computes an MoE layer's output for `x` `[N, H]`."""
        positions = layout.positions.to(self.device).unsqueeze(0)
        kwargs = {self._cache_kwarg: cache.step(layout), LAYOUT_KWARG: layout, "position_ids": positions}
        with torch.inference_mode():
            hidden = self.embed(input_ids.to(self.device).unsqueeze(0))
            embeddings = self.rotary_emb(hidden, positions)
        for index, decoder in enumerate(self.layers):
            with torch.inference_mode():
                hidden = decoder(hidden, position_embeddings=embeddings, **kwargs)
            hole = self.holes.get(index)
            if hole is not None:
                taken, hole.taken = hole.taken, None
                out = await moe(index, taken[0])
                with torch.inference_mode():
                    hidden = hidden + out.to(device=hidden.device, dtype=hidden.dtype).unsqueeze(0)
        with torch.inference_mode():
            return self.norm(hidden)[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """`[n, H]` final hidden states -> `[n, vocab]` float32 logits."""
        with torch.inference_mode():
            return self.model.lm_head(hidden).float()


def _cache_kwarg(decoder_cls: type) -> str:
    """`cache` in transformers 5.25 and later, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(decoder_cls.forward).parameters else "past_key_values"


def _load(model: torch.nn.Module, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype, device: torch.device) -> None:
    """Load `tensors` into the meta-built `model`; DenseWeightsError naming what is missing or left over."""
    expected = dict(model.named_parameters())
    tied = getattr(model.config, "tie_word_embeddings", False)
    missing = [k for k in expected if k not in tensors and not (tied and k == "lm_head.weight")]
    extra = [k for k in tensors if k not in expected]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} dense tensors, first {missing[:3]}")
        if extra:
            parts.append(f"{len(extra)} tensors the model has no place for, first {extra[:3]}")
        raise DenseWeightsError("; ".join(parts))
    for key, param in expected.items():
        value = tensors.get(key)
        if value is None:
            continue
        if tuple(value.shape) != tuple(param.shape):
            raise DenseWeightsError(f"tensor {key!r} has shape {list(value.shape)}, the config says {list(param.shape)}")
        module_name, _, name = key.rpartition(".")
        module = model.get_submodule(module_name)
        setattr(module, name, torch.nn.Parameter(value.to(device=device, dtype=dtype), requires_grad=False))
    if tied:
        model.lm_head.weight = model.get_input_embeddings().weight
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta and "rotary_emb" not in n]
    if left:
        raise DenseWeightsError(f"no values for {left[:3]} ({len(left)} in all)")
