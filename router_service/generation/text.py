"""What the edges (OpenAI HTTP, KServe text over gRPC) need to serve text: prompts and chat
messages to token ids with the checkpoint's own tokenizer and chat template, token ids back to
text, and the engine that generates.

`build_text_model` makes one from a checkpoint directory (its config, tokenizer files and chat
template) and the dense tensors the composition root read from it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import torch

from router_service.errors import InvalidRequest
from router_service.generation.dense_model import DenseModel
from router_service.generation.engine import (
    EngineSettings,
    GenerationEngine,
    GenerationMetrics,
    GenerationStream,
    MoECall,
)
from router_service.generation.params import SamplingParams

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
ROLES = ("system", "user", "assistant", "tool", "developer")


def has_tokenizer(checkpoint: str | Path) -> bool:
    return any((Path(checkpoint) / name).is_file() for name in TOKENIZER_FILES)


class TextModel:
    """name: what clients call the model; default_max_tokens: new tokens when a request does not
    say; expert_skip_threshold: the model's expert skipping, for requests that do not set theirs."""

    def __init__(self, name: str, engine: GenerationEngine, tokenizer, default_max_tokens: int = 16,
                 expert_skip_threshold: float = 0.0):
        self.name = name
        self.engine = engine
        self.tokenizer = tokenizer
        self.default_max_tokens = default_max_tokens
        self.expert_skip_threshold = expert_skip_threshold
        self.vocab_size = engine.model.vocab_size

    def __repr__(self) -> str:
        return f"TextModel({self.name!r}, {self.engine!r})"

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def prompt_ids(self, prompt: str | Sequence[int]) -> list[int]:
        """A prompt as text (tokenized as the tokenizer does by default) or as token ids."""
        if isinstance(prompt, str):
            return list(self.tokenizer(prompt).input_ids)
        ids = list(prompt)
        bad = [t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequest(f"prompt token ids must be integers in [0, {self.vocab_size}), got {bad[:5]!r}")
        return ids

    def chat_ids(self, messages: Sequence[Mapping]) -> list[int]:
        """Chat messages through the tokenizer's chat template, ending with the assistant's turn."""
        if not self.has_chat_template:
            raise InvalidRequest(f"model '{self.name}' has no chat template; use /v1/completions with a prompt")
        if not messages:
            raise InvalidRequest("messages is empty; send at least one message")
        plain = []
        for i, m in enumerate(messages):
            role, content = m.get("role"), m.get("content")
            if role not in ROLES:
                raise InvalidRequest(f"messages[{i}].role must be one of {list(ROLES)}, got {role!r}")
            if isinstance(content, list):  # OpenAI content parts: keep the text ones
                content = "".join(p.get("text", "") for p in content if isinstance(p, Mapping) and p.get("type") == "text")
            if not isinstance(content, str):
                raise InvalidRequest(f"messages[{i}].content must be a string or a list of text parts, got {content!r}")
            plain.append({"role": role, "content": content})
        try:
            ids = self.tokenizer.apply_chat_template(plain, add_generation_prompt=True, tokenize=True)
        except Exception as err:  # the template's own checks (e.g. roles must alternate)
            raise InvalidRequest(f"the chat template refused the messages: {err}") from None
        return list(ids["input_ids"] if isinstance(ids, Mapping) else ids)

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> GenerationStream:
        """Queue a request; a request that sets no `expert_skip_threshold` gets the model's."""
        if params.expert_skip_threshold is None:
            params = replace(params, expert_skip_threshold=self.expert_skip_threshold)
        return self.engine.submit(prompt_ids, params)

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    async def close(self) -> None:
        await self.engine.close()


def build_text_model(name: str, checkpoint: str | Path, tensors: Mapping[str, torch.Tensor],
                     moe_layers: Sequence[int], moe: MoECall, settings: EngineSettings, device: str = "auto",
                     default_max_tokens: int = 16, metrics: GenerationMetrics | None = None,
                     expert_skip_threshold: float = 0.0) -> TextModel:
    """The checkpoint's text model: its config, tokenizer and chat template from `checkpoint`,
    the dense tensors from `tensors`; the MoE layers go to `moe`. DenseWeightsError when the
    tensors are not the model's dense part. expert_skip_threshold: the model's (0: off)."""
    from transformers import AutoConfig, AutoTokenizer

    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    config = AutoConfig.from_pretrained(checkpoint)
    model = DenseModel(config, tensors, moe_layers, device=device)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    engine = GenerationEngine(model, tokenizer, moe, settings, _eos_ids(checkpoint, config, tokenizer), metrics)
    log.info("text model %r: %s, %s", name, model, engine)
    return TextModel(name, engine, tokenizer, default_max_tokens, expert_skip_threshold)


def _eos_ids(checkpoint: str | Path, config, tokenizer) -> list[int]:
    """End-of-sequence ids as `transformers`' `generate` takes them: the generation config's,
    else the model config's, else the tokenizer's."""
    from transformers import GenerationConfig

    try:
        found = GenerationConfig.from_pretrained(checkpoint).eos_token_id
    except OSError:  # no generation_config.json
        found = None
    if found is None:
        found = getattr(config, "eos_token_id", None)
    if found is None:
        found = tokenizer.eos_token_id
    return [found] if isinstance(found, int) else list(found or [])
