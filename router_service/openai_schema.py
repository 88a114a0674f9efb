"""The OpenAI-compatible API's request bodies: pydantic v2 models that check the types (unknown
fields are ignored, as OpenAI does), and the one translation from a request to `SamplingParams`,
which checks the values. Every mistake is an `InvalidRequest` whose message names the field;
`FieldError` also carries it as `param` for the OpenAI error object.

Values are checked in one place, `SamplingParams` (whichever edge a request came through); this
module only checks what the OpenAI API allows beyond it (`n`, `echo`, penalties, `best_of`...).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from router_service.errors import InvalidRequest
from router_service.generation.params import SamplingParams

PROMPT_SHAPES = "a string, a list of strings, a list of token ids or a list of lists of token ids"
MAX_INPUT_CHARS = 80  # of a bad value quoted back in an error message

Request = TypeVar("Request", bound=BaseModel)


class FieldError(InvalidRequest):
    """An `InvalidRequest` about one field of the request body (`param`, as OpenAI names it)."""

    def __init__(self, message: str, param: str | None):
        super().__init__(message)
        self.param = param


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    include_usage: bool | None = None  # usage is always sent: every answer has its counts


class _Sampling(BaseModel):
    """The fields both endpoints share. None: the server's default."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # extension (vLLM): 0 or -1 keep every token
    seed: int | None = None
    stop: Any = ()  # normalised to a tuple of strings
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = False  # extension (vLLM): go on past end-of-sequence tokens
    expert_skip_threshold: float | None = None  # extension (ours): expert skipping, None: the model's
    user: str | None = None  # accepted, not used

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, value: Any) -> tuple[str, ...]:
        if value is None:
            return ()
        if isinstance(value, str):
            return (value,)
        if isinstance(value, list) and all(isinstance(s, str) for s in value):
            return tuple(value)
        raise ValueError("must be a string or a list of strings")

    def _refuse_unsupported(self) -> None:
        if self.n not in (None, 1):
            raise FieldError(f"n must be 1: this server returns one choice per prompt, got {self.n}", "n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0):
                raise FieldError(f"{name} is not supported: leave it out or send 0, got {getattr(self, name)}", name)
        if self.logit_bias:
            raise FieldError("logit_bias is not supported: leave it out or send {}", "logit_bias")

    def _params(self, max_tokens: int | None, logprobs: int | None, default_max_tokens: int,
                names: Mapping[str, str]) -> SamplingParams:
        """names: `SamplingParams` field -> the request field it came from, when they differ."""
        self._refuse_unsupported()
        fields = {"max_tokens": default_max_tokens if max_tokens is None else max_tokens,
                  "temperature": 1.0 if self.temperature is None else self.temperature,
                  "top_p": 1.0 if self.top_p is None else self.top_p,
                  "top_k": 0 if self.top_k is None else self.top_k,
                  "seed": self.seed, "stop": self.stop, "logprobs": logprobs, "ignore_eos": self.ignore_eos,
                  "expert_skip_threshold": self.expert_skip_threshold}
        try:
            return SamplingParams(**fields)
        except InvalidRequest as err:  # its messages start with the field they are about
            message = str(err)
            field = message.split(" ", 1)[0]
            if field not in fields:
                raise FieldError(message, None) from None
            public = names.get(field, field)
            raise FieldError(public + message[len(field):], public) from None

    @property
    def asked_max_tokens(self) -> bool:
        return self.max_tokens is not None


class CompletionRequest(_Sampling):
    """`POST /v1/completions`. prompt: normalised to a list of prompts, each text or token ids."""

    prompt: Any
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, value: Any) -> list[str | list[int]]:
        if isinstance(value, str):
            return [value]
        if not isinstance(value, list) or not value:
            raise ValueError(f"must be {PROMPT_SHAPES}" + (" (not empty)" if value == [] else ""))
        if all(isinstance(p, str) for p in value):
            return list(value)
        if all(_is_token(t) for t in value):
            return [list(value)]
        if all(isinstance(p, list) and all(_is_token(t) for t in p) for p in value):
            return [list(p) for p in value]
        raise ValueError(f"must be {PROMPT_SHAPES}")

    def sampling_params(self, default_max_tokens: int) -> SamplingParams:
        if self.echo:
            raise FieldError("echo is not supported: leave it out or send false", "echo")
        if self.best_of not in (None, 1):
            raise FieldError(f"best_of must be 1: this server samples one completion per prompt, got {self.best_of}",
                             "best_of")
        if self.suffix:
            raise FieldError("suffix is not supported: leave it out", "suffix")
        return self._params(self.max_tokens, self.logprobs, default_max_tokens, {})


class ChatCompletionRequest(_Sampling):
    """`POST /v1/chat/completions`. messages: checked by the model's chat template
    (`TextModel.chat_ids`); max_completion_tokens wins over max_tokens (its old name)."""

    messages: list[dict[str, Any]]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None

    @property
    def asked_max_tokens(self) -> bool:
        return self.max_tokens is not None or self.max_completion_tokens is not None

    def sampling_params(self, default_max_tokens: int) -> SamplingParams:
        if self.top_logprobs is not None and not self.logprobs:
            raise FieldError("top_logprobs needs logprobs: true", "top_logprobs")
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        if self.max_completion_tokens is not None:
            max_tokens, names = self.max_completion_tokens, {"max_tokens": "max_completion_tokens"}
        else:
            max_tokens, names = self.max_tokens, {}
        return self._params(max_tokens, logprobs, default_max_tokens, {**names, "logprobs": "top_logprobs"})


def parse_request(kind: type[Request], body: bytes) -> Request:
    """The request body as `kind`; FieldError naming the field (or the body) when it is not one."""
    try:
        return kind.model_validate_json(body)
    except ValidationError as err:
        message, param = describe_validation_error(err)
        raise FieldError(message, param) from None


def describe_validation_error(err: ValidationError) -> tuple[str, str | None]:
    """pydantic's first complaint as (a message that names the field, the field's path)."""
    first = err.errors(include_url=False)[0]
    kind, path = first["type"], _path(first["loc"])
    if kind == "json_invalid":
        return f"the request body is not valid JSON: {first['msg'].removeprefix('Invalid JSON: ')}", None
    if not path:
        return "the request body must be a JSON object", None
    if kind == "missing":
        return f"{path} is required", path
    if kind == "value_error":
        why = str(first["ctx"]["error"])
    else:
        why = first["msg"][0].lower() + first["msg"][1:]
    return f"{path}: {why}, got {_quoted(first['input'])}", path


def fit_max_tokens(params: SamplingParams, asked: bool, prompt_tokens: int, max_model_len: int) -> SamplingParams:
    """A request that did not ask for max_tokens gets the default, cut to what the context
    leaves after its prompt (one asking too much is refused by `check_length`)."""
    if asked:
        return params
    room = max(1, max_model_len - prompt_tokens)
    return params if params.max_tokens <= room else replace(params, max_tokens=room)


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _path(loc: tuple) -> str:
    """("messages", 0, "role") -> "messages[0].role"."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _quoted(value: Any) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= MAX_INPUT_CHARS else f"{text[:MAX_INPUT_CHARS]}..."
