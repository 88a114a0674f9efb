"""What a generation request may ask for, checked once whichever edge it came through (OpenAI
HTTP, KServe text over gRPC): every bad value is an `InvalidRequest` naming the field, as the
OpenAI API and vLLM name them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from router_service.errors import InvalidRequest
from router_service.skipping import check_threshold

MAX_LOGPROBS = 5  # top alternatives a token's log-probabilities may list
MAX_STOP_STRINGS = 4  # as the OpenAI API allows


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each new token and when to stop.

    max_tokens: new tokens at most; temperature: 0 is greedy (argmax), otherwise logits are
    divided by it; top_p: sample from the smallest set of tokens whose probability reaches it
    (1: all); top_k: from the k most likely (0: all); seed: a seeded generator of its own, so
    the same request gives the same tokens whatever else runs beside it; stop: strings that end
    the output (not included in it); logprobs: with each token, its log-probability under the
    model and the `logprobs` most likely alternatives (None: none); ignore_eos: go on past
    end-of-sequence tokens (benchmarks); expert_skip_threshold: drop the routed experts whose
    renormalised gate weight is below it, keeping the top one (`router_service.skipping`; 0:
    none; None: the model's `model.expert_skip_threshold`).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    logprobs: int | None = None
    ignore_eos: bool = False
    expert_skip_threshold: float | None = None

    def __post_init__(self) -> None:
        _integer("max_tokens", self.max_tokens, low=1)
        _number("temperature", self.temperature)
        if self.temperature < 0:
            raise InvalidRequest(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        _number("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p}")
        _integer("top_k", self.top_k, low=-1)
        if self.seed is not None:
            _integer("seed", self.seed, low=-(2**63), high=2**63 - 1)
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) and s for s in self.stop):
            raise InvalidRequest(f"stop must be a string or a list of non-empty strings, got {self.stop!r}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidRequest(f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}")
        if self.logprobs is not None:
            _integer("logprobs", self.logprobs, low=0, high=MAX_LOGPROBS)
        if self.expert_skip_threshold is not None:
            check_threshold(self.expert_skip_threshold, "expert_skip_threshold")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def check_length(self, prompt_tokens: int, max_model_len: int) -> None:
        """InvalidRequest when the prompt, or the prompt with `max_tokens` more, exceeds the
        model's context of `max_model_len` tokens."""
        if prompt_tokens == 0:
            raise InvalidRequest("the prompt is empty; send at least one token of text")
        if prompt_tokens >= max_model_len:
            raise InvalidRequest(f"the prompt has {prompt_tokens} tokens; this model's context is {max_model_len} "
                                 f"tokens, which must also hold at least one new token")
        if prompt_tokens + self.max_tokens > max_model_len:
            raise InvalidRequest(f"max_tokens ({self.max_tokens}) plus the prompt's {prompt_tokens} tokens exceed "
                                 f"this model's context of {max_model_len} tokens; ask for at most "
                                 f"{max_model_len - prompt_tokens}")


def _integer(name: str, value: object, low: int | None = None, high: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidRequest(f"{name} must be an integer, got {value!r}")
    if low is not None and value < low or high is not None and value > high:
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise InvalidRequest(f"{name} must be {bounds}, got {value}")


def _number(name: str, value: object) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise InvalidRequest(f"{name} must be a finite number, got {value!r}")
