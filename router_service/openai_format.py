"""The OpenAI-compatible API's answers: completion and chat objects, their stream chunks, usage,
log-probabilities in each endpoint's format and error objects. Pure: values in, JSON-ready dicts
out; the server (`router_service.openai_http`) adds the id, the time and the model.

A choice is built from the `StepOutput`s of one prompt's `GenerationStream`, gathered in a
`Choice`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from router_service.generation.engine import StepOutput, TokenLogprob

TokenText = Callable[[int], str]  # token id -> its text


@dataclass
class Choice:
    """One prompt's answer so far. index: the prompt's place in the request; prompt_tokens: its
    length; offsets: where in `text` each token of `logprobs` shows (its step's text starts)."""

    index: int
    prompt_tokens: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    finish_reason: str | None = None

    def add(self, out: StepOutput) -> None:
        self.offsets += [len(self.text)] * len(out.logprobs)
        self.text += out.text
        self.token_ids += out.token_ids
        self.logprobs += out.logprobs
        self.finish_reason = out.finish_reason or self.finish_reason

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class Header:
    """What every object of one answer repeats: id ("cmpl-..." / "chatcmpl-..."), created (unix s), model."""

    id: str
    created: int
    model: str

    def fields(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}


def sse(obj: dict | str) -> bytes:
    """One server-sent event: `data: <json or text>` and a blank line."""
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode()


def usage(choices: Sequence[Choice]) -> dict:
    prompt = sum(c.prompt_tokens for c in choices)
    completion = sum(c.completion_tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def error_object(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def model_card(name: str, created: int, max_model_len: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "moe-serve", "max_model_len": max_model_len}


# ---- /v1/completions ---------------------------------------------------------------------------


def completion_logprobs(logprobs: Sequence[TokenLogprob], offsets: Sequence[int], token_text: TokenText) -> dict:
    """The completions format: tokens, token_logprobs, top_logprobs (per token a dict of the
    most likely tokens and the chosen one, text -> logprob) and text_offset (`offsets`: where in
    the choice's text each token shows)."""
    tokens, top = [], []
    for lp in logprobs:
        text = token_text(lp.token_id)
        tokens.append(text)
        alternatives = {token_text(t): v for t, v in lp.top}
        alternatives.setdefault(text, lp.logprob)
        top.append(alternatives)
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in logprobs], "top_logprobs": top,
            "text_offset": list(offsets)}


def completion(header: Header, choices: Sequence[Choice], token_text: TokenText, logprobs: bool) -> dict:
    """The whole answer of a non-streaming `/v1/completions` call."""
    return {**header.fields("text_completion"),
            "choices": [{"index": c.index, "text": c.text, "finish_reason": c.finish_reason,
                         "logprobs": completion_logprobs(c.logprobs, c.offsets, token_text) if logprobs else None}
                        for c in choices],
            "usage": usage(choices)}


def completion_chunk(header: Header, index: int, out: StepOutput, token_text: TokenText, logprobs: bool,
                     offset: int) -> dict:
    """One step of one prompt as a stream chunk; offset: characters of this choice sent before."""
    lps = completion_logprobs(out.logprobs, [offset] * len(out.logprobs), token_text) if logprobs else None
    return {**header.fields("text_completion"),
            "choices": [{"index": index, "text": out.text, "finish_reason": None, "logprobs": lps}]}


def completion_finish_chunk(header: Header, choice: Choice) -> dict:
    return {**header.fields("text_completion"),
            "choices": [{"index": choice.index, "text": "", "finish_reason": choice.finish_reason, "logprobs": None}]}


# ---- /v1/chat/completions ----------------------------------------------------------------------


def _chat_token(text: str, logprob: float) -> dict:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def chat_logprobs(logprobs: Sequence[TokenLogprob], token_text: TokenText) -> dict:
    """The chat format: `{"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}`."""
    return {"content": [{**_chat_token(token_text(lp.token_id), lp.logprob),
                         "top_logprobs": [_chat_token(token_text(t), v) for t, v in lp.top]}
                        for lp in logprobs]}


def chat_completion(header: Header, choices: Sequence[Choice], token_text: TokenText, logprobs: bool) -> dict:
    """The whole answer of a non-streaming `/v1/chat/completions` call."""
    return {**header.fields("chat.completion"),
            "choices": [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                         "finish_reason": c.finish_reason,
                         "logprobs": chat_logprobs(c.logprobs, token_text) if logprobs else None}
                        for c in choices],
            "usage": usage(choices)}


def chat_chunk(header: Header, index: int, delta: dict, finish_reason: str | None = None,
               logprobs: dict | None = None) -> dict:
    """delta: `{"role": "assistant", "content": ""}` first, then `{"content": text}`, `{}` at the finish."""
    return {**header.fields("chat.completion.chunk"),
            "choices": [{"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": logprobs}]}


def usage_chunk(header: Header, obj: str, choices: Sequence[Choice]) -> dict:
    """The last chunk of a stream: no choices, the usage of all of them."""
    return {**header.fields(obj), "choices": [], "usage": usage(choices)}


# ---- one endpoint's shapes, for the server's single generation path ------------------------------


@dataclass(frozen=True)
class CompletionFormat:
    """`/v1/completions`: token_text for log-probabilities; logprobs: whether the request asked."""

    token_text: TokenText
    logprobs: bool
    object: str = "text_completion"
    id_prefix: str = "cmpl-"

    def first_chunks(self, header: Header, choices: Sequence[Choice]) -> list[dict]:
        return []

    def step_chunks(self, header: Header, choice: Choice, out: StepOutput) -> list[dict]:
        """Chunks for `out`, before `choice.add(out)`."""
        if not out.text and not (self.logprobs and out.logprobs):
            return []
        return [completion_chunk(header, choice.index, out, self.token_text, self.logprobs, len(choice.text))]

    def finish_chunk(self, header: Header, choice: Choice) -> dict:
        return completion_finish_chunk(header, choice)

    def whole(self, header: Header, choices: Sequence[Choice]) -> dict:
        return completion(header, choices, self.token_text, self.logprobs)


@dataclass(frozen=True)
class ChatFormat:
    """`/v1/chat/completions`: the first delta of each choice carries the role."""

    token_text: TokenText
    logprobs: bool
    object: str = "chat.completion.chunk"
    id_prefix: str = "chatcmpl-"

    def first_chunks(self, header: Header, choices: Sequence[Choice]) -> list[dict]:
        return [chat_chunk(header, c.index, {"role": "assistant", "content": ""}) for c in choices]

    def step_chunks(self, header: Header, choice: Choice, out: StepOutput) -> list[dict]:
        if not out.text and not (self.logprobs and out.logprobs):
            return []
        logprobs = chat_logprobs(out.logprobs, self.token_text) if self.logprobs else None
        return [chat_chunk(header, choice.index, {"content": out.text}, logprobs=logprobs)]

    def finish_chunk(self, header: Header, choice: Choice) -> dict:
        return chat_chunk(header, choice.index, {}, choice.finish_reason)

    def whole(self, header: Header, choices: Sequence[Choice]) -> dict:
        return chat_completion(header, choices, self.token_text, self.logprobs)
