"""The OpenAI-compatible HTTP API over a real tiny model (no Ray; loopback only, see
`tests/unit/text_server.py`): greedy answers equal `transformers`' `generate` token for token on
both endpoints, streaming or not; usage, stop strings, seeds and log-probabilities; every bad
input is a 4xx OpenAI error object naming the field, and the server serves on; a full queue is
429, a cold model 503, an error in a stream an error event; a client that goes away frees its
sequence; tokens, TLS, metrics and a graceful stop."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

import aiohttp
import pytest
import torch

from cluster.config import SecurityConfig
from router_service.openai_http import HttpServer, start_http_server
from router_service.security import MIN_TOKEN_CHARS
from tests.unit.test_security import Pki, make_pki
from tests.unit.text_server import LocalMoE, LoopThread, Recorder, TextRouter, fetch, parse_events, stream, text_model

transformers = pytest.importorskip("transformers")

FAMILY = "deepseek-v3"  # MLA attention, shared experts, a dense first layer; greedy meets end-of-sequence
PROMPTS = ["the cat sat on", "a big red sun", "where birds sing of rain"]  # the first two end at end-of-sequence
TOKEN = "inference-token-" + "x" * MIN_TOKEN_CHARS
ADMIN = "admin-token-" + "y" * MIN_TOKEN_CHARS


@dataclass
class Setup:
    loop: LoopThread
    server: HttpServer
    url: str
    hf: torch.nn.Module
    tiny: TextRouter  # max_num_seqs 8
    held: TextRouter  # max_num_seqs 1, max_waiting 1, its MoE can be held or failed
    held_moe: LocalMoE
    metrics: Recorder
    path: str

    def run(self, coro, timeout_s: float = 60.0):
        return self.loop.run(coro, timeout_s)

    def post(self, endpoint: str, body: dict, **kw):
        return self.run(fetch(f"{self.url}{endpoint}", body=body, **kw))

    def stream(self, endpoint: str, body: dict):
        return self.run(stream(f"{self.url}{endpoint}", {**body, "stream": True}))

    def greedy(self, prompt_ids: list[int], max_new_tokens: int, ignore_eos: bool = False) -> list[int]:
        """transformers' own greedy continuation (ending at end-of-sequence unless ignore_eos)."""
        with torch.no_grad():
            out = self.hf.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
                                   **({"eos_token_id": None} if ignore_eos else {}), pad_token_id=0)
        return out[0, len(prompt_ids):].tolist()

    def token_strings(self, ids: list[int]) -> list[str]:
        return [self.tiny.text.token_text(t) for t in ids]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Iterator[Setup]:
    from workers.hf_checkpoint import HFCheckpoint
    from workers.tiny_models import BY_NAME

    path = tmp_path_factory.mktemp(f"tiny-{FAMILY}")
    BY_NAME[FAMILY].save(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    checkpoint = HFCheckpoint(path)
    tensors, layers = checkpoint.dense_tensors(), checkpoint.spec.moe_layers
    held_moe = LocalMoE(hf)
    tiny = TextRouter("tiny", text_model("tiny", path, tensors, layers, LocalMoE(hf)))
    held = TextRouter("held", text_model("held", path, tensors, layers, held_moe, max_num_seqs=1, max_waiting=1))
    models = {"tiny": tiny, "held": held, "cold": TextRouter("cold", tiny.text, ready=False),
              "layers-only": TextRouter("layers-only", None)}
    loop, metrics = LoopThread(), Recorder()
    server = loop.run(start_http_server(models, "127.0.0.1", 0, metrics=metrics))
    loop.run(server.set_serving(True))
    yield Setup(loop, server, f"http://127.0.0.1:{server.port}", hf, tiny, held, held_moe, metrics, str(path))
    loop.run(server.stop(1.0))
    loop.run(tiny.text.close())
    loop.run(held.text.close())
    loop.close()


def engine_idle(text) -> bool:
    stats = text.engine.stats()
    return stats["running"] == 0 and stats["waiting"] == 0 and stats["kv_used_fraction"] == 0


def wait_for(setup: Setup, predicate, what: str, timeout_s: float = 20.0) -> None:
    """Poll `predicate` on the server's loop until true; AssertionError naming `what` after `timeout_s`."""
    async def poll():
        while not predicate():
            await asyncio.sleep(0.01)

    try:
        setup.run(asyncio.wait_for(poll(), timeout_s), timeout_s + 5)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout_s:g}s waiting for {what}") from None


# ---- models and health --------------------------------------------------------------------------


def test_models_lists_the_models_that_generate_text(setup: Setup) -> None:
    answer = setup.run(fetch(f"{setup.url}/v1/models", "GET"))
    assert answer.status == 200 and answer.body["object"] == "list"
    cards = {m["id"]: m for m in answer.body["data"]}
    assert set(cards) == {"tiny", "held", "cold"}  # layers-only generates no text
    assert cards["tiny"]["object"] == "model" and cards["tiny"]["owned_by"] == "moe-serve"
    assert cards["tiny"]["max_model_len"] == 64 and isinstance(cards["tiny"]["created"], int)
    one = setup.run(fetch(f"{setup.url}/v1/models/tiny", "GET"))
    assert one.status == 200 and one.body["id"] == "tiny"


def test_health_follows_set_serving(setup: Setup) -> None:
    assert setup.run(fetch(f"{setup.url}/health", "GET")).body == {"status": "ok"}
    setup.run(setup.server.set_serving(False))
    try:
        assert setup.run(fetch(f"{setup.url}/health", "GET")).status == 503
    finally:
        setup.run(setup.server.set_serving(True))
    assert setup.run(fetch(f"{setup.url}/health", "GET")).status == 200


# ---- answers equal transformers ------------------------------------------------------------------


@pytest.mark.parametrize("ignore_eos", [False, True], ids=["until-eos", "ignore-eos"])
def test_greedy_completions_equal_transformers(setup: Setup, ignore_eos: bool) -> None:
    text = setup.tiny.text
    prompt_ids = [text.prompt_ids(p) for p in PROMPTS]
    body = {"model": "tiny", "prompt": PROMPTS, "max_tokens": 12, "temperature": 0, "logprobs": 0,
            "ignore_eos": ignore_eos}
    answer = setup.post("/v1/completions", body)
    assert answer.status == 200, answer.body
    assert answer.body["object"] == "text_completion" and answer.body["id"].startswith("cmpl-")
    choices = answer.body["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2]
    for ids, choice in zip(prompt_ids, choices):
        want = setup.greedy(ids, 12, ignore_eos)
        assert choice["logprobs"]["tokens"] == setup.token_strings(want)
        ends_at_eos = want[-1] == 2 and not ignore_eos
        assert choice["finish_reason"] == ("stop" if ends_at_eos else "length")
        assert choice["text"] == text.tokenizer.decode(ids + want, skip_special_tokens=True)[
            len(text.tokenizer.decode(ids, skip_special_tokens=True)):]
    reasons = [c["finish_reason"] for c in choices]
    assert reasons == ["length"] * 3 if ignore_eos else "stop" in reasons and "length" in reasons
    completion = sum(len(c["logprobs"]["tokens"]) for c in choices)
    prompt = sum(len(i) for i in prompt_ids)
    assert answer.body["usage"] == {"prompt_tokens": prompt, "completion_tokens": completion,
                                    "total_tokens": prompt + completion}


def test_streamed_completions_equal_the_whole_answer(setup: Setup) -> None:
    body = {"model": "tiny", "prompt": PROMPTS[:2], "max_tokens": 10, "temperature": 0, "logprobs": 0,
            "ignore_eos": True}
    whole = setup.post("/v1/completions", body).body
    status, content_type, events = setup.stream("/v1/completions", body)
    assert status == 200 and content_type.startswith("text/event-stream")
    assert events[-1] == "[DONE]"
    usage = events[-2]
    assert usage["choices"] == [] and usage["usage"] == whole["usage"]
    for index, choice in enumerate(whole["choices"]):
        chunks = [c["choices"][0] for c in events[:-2] if c["choices"][0]["index"] == index]
        assert all(e["object"] == "text_completion" for e in events[:-2])
        assert "".join(c["text"] for c in chunks) == choice["text"]
        tokens = [t for c in chunks if c["logprobs"] for t in c["logprobs"]["tokens"]]
        assert tokens == choice["logprobs"]["tokens"]
        offsets = [o for c in chunks if c["logprobs"] for o in c["logprobs"]["text_offset"]]
        assert offsets == choice["logprobs"]["text_offset"]
        assert [c["finish_reason"] for c in chunks if c["finish_reason"]] == ["length"]


def _chat_reference(setup: Setup, messages: list[dict], new_tokens: int) -> tuple[list[int], list[int]]:
    """(the chat template's prompt ids, transformers' greedy continuation of them)."""
    tokenizer = setup.tiny.text.tokenizer
    ids = tokenizer(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)).input_ids
    return list(ids), setup.greedy(list(ids), new_tokens, ignore_eos=True)


def test_greedy_chat_equals_transformers_streaming_or_not(setup: Setup) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the dog ran far"}]
    prompt_ids, want = _chat_reference(setup, messages, 10)
    body = {"model": "tiny", "messages": messages, "max_completion_tokens": 10, "temperature": 0,
            "logprobs": True, "top_logprobs": 2, "ignore_eos": True}
    answer = setup.post("/v1/chat/completions", body)
    assert answer.status == 200, answer.body
    assert answer.body["object"] == "chat.completion" and answer.body["id"].startswith("chatcmpl-")
    choice = answer.body["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "length"
    content = choice["logprobs"]["content"]
    assert [c["token"] for c in content] == setup.token_strings(want)
    for item in content:
        assert len(item["top_logprobs"]) == 2 and item["bytes"] == list(item["token"].encode())
        assert item["logprob"] == pytest.approx(item["top_logprobs"][0]["logprob"])  # greedy: the top token
    assert answer.body["usage"] == {"prompt_tokens": len(prompt_ids), "completion_tokens": 10,
                                    "total_tokens": len(prompt_ids) + 10}

    status, _, events = setup.stream("/v1/chat/completions", body)
    assert status == 200 and events[-1] == "[DONE]"
    chunks = events[:-2]
    assert all(e["object"] == "chat.completion.chunk" for e in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    deltas = [c["choices"][0] for c in chunks[1:]]
    assert "".join(d["delta"].get("content", "") for d in deltas) == choice["message"]["content"]
    streamed = [t["token"] for d in deltas if d["logprobs"] for t in d["logprobs"]["content"]]
    assert streamed == setup.token_strings(want)
    assert deltas[-1] == {"index": 0, "delta": {}, "finish_reason": "length", "logprobs": None}
    assert events[-2]["usage"] == answer.body["usage"] and events[-2]["choices"] == []


def test_prompt_as_token_ids_equals_the_same_text(setup: Setup) -> None:
    ids = setup.tiny.text.prompt_ids(PROMPTS[0])
    by_text = setup.post("/v1/completions", {"model": "tiny", "prompt": PROMPTS[0], "temperature": 0})
    by_ids = setup.post("/v1/completions", {"model": "tiny", "prompt": ids, "temperature": 0})
    nested = setup.post("/v1/completions", {"model": "tiny", "prompt": [ids, ids], "temperature": 0})
    assert by_text.body["choices"][0]["text"] == by_ids.body["choices"][0]["text"]
    assert [c["text"] for c in nested.body["choices"]] == [by_ids.body["choices"][0]["text"]] * 2
    assert by_ids.body["usage"]["completion_tokens"] <= 16  # the default max_tokens


def test_a_stop_string_ends_the_text_before_it(setup: Setup) -> None:
    body = {"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    full = setup.post("/v1/completions", body).body["choices"][0]["text"]
    stop = full[len(full) // 2:len(full) // 2 + 2]
    assert stop.strip(), f"pick another prompt: {full!r} has no usable middle"
    for answer in (setup.post("/v1/completions", {**body, "stop": [stop, "zzzz"]}),
                   setup.post("/v1/completions", {**body, "stop": stop})):
        choice = answer.body["choices"][0]
        assert choice["text"] == full[:full.index(stop)] and choice["finish_reason"] == "stop"


def test_seeded_sampling_is_reproducible(setup: Setup) -> None:
    body = {"model": "tiny", "prompt": PROMPTS[1], "max_tokens": 16, "temperature": 1.5, "top_k": 20,
            "top_p": 0.95, "seed": 1234, "ignore_eos": True, "logprobs": 0}
    first = setup.post("/v1/completions", body).body["choices"][0]
    again = setup.post("/v1/completions", body).body["choices"][0]
    assert first["logprobs"]["tokens"] == again["logprobs"]["tokens"] and first["text"] == again["text"]
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "seed": 7, "temperature": 1.2}
    assert setup.post("/v1/chat/completions", chat).body["choices"] == \
        setup.post("/v1/chat/completions", chat).body["choices"]


def test_completion_logprobs_have_the_openai_shape(setup: Setup) -> None:
    answer = setup.post("/v1/completions", {"model": "tiny", "prompt": PROMPTS[2], "max_tokens": 6,
                                            "temperature": 0, "logprobs": 3, "ignore_eos": True})
    logprobs = answer.body["choices"][0]["logprobs"]
    assert set(logprobs) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"]) == 6
    offsets = logprobs["text_offset"]
    assert offsets[0] == 0 and offsets == sorted(offsets)
    for token, value, top in zip(logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"]):
        assert value <= 0 and 3 <= len(top) <= 4 and top[token] == pytest.approx(value)
        assert value == pytest.approx(max(top.values()))  # greedy picked the most likely


# ---- bad requests --------------------------------------------------------------------------------


BAD = [
    ("/v1/completions", {"model": "tiny", "prompt": ""}, "prompt", "empty-prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": []}, "prompt", "empty-prompt-list"),
    ("/v1/completions", {"model": "tiny", "prompt": [[]]}, "prompt", "empty-token-list"),
    ("/v1/completions", {"model": "tiny", "prompt": [5] * 64}, "prompt", "prompt-longer-than-the-context"),
    ("/v1/completions", {"model": "tiny", "prompt": [999]}, "prompt", "token-id-out-of-range"),
    ("/v1/completions", {"model": "tiny", "prompt": [1, "a"]}, "prompt", "mixed-prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": "a", "max_tokens": 0}, "max_tokens", "max-tokens-0"),
    ("/v1/completions", {"model": "tiny", "prompt": "a", "max_tokens": 10**6}, "max_tokens", "max-tokens-huge"),
    ("/v1/completions", {"model": "tiny", "prompt": "a", "max_tokens": "ten"}, "max_tokens", "max-tokens-string"),
    ("/v1/completions", {"model": "tiny", "prompt": "a", "temperature": -0.5}, "temperature", "negative-temperature"),
    ("/v1/completions", {"model": "tiny", "prompt": "a", "temperature": "hot"}, "temperature", "temperature-string"),
    ("/v1/completions", {"model": "tiny", "prompt": "a", "top_p": 0}, "top_p", "top-p-0"),
    ("/v1/completions", {"model": "tiny", "prompt": "a", "top_p": 1.5}, "top_p", "top-p-1.5"),
    ("/v1/completions", {"model": "tiny", "prompt": "a", "logprobs": 6}, "logprobs", "logprobs-6"),
    ("/v1/completions", {"model": "tiny", "prompt": "a", "n": 2}, "n", "n-2"),
    ("/v1/completions", {"model": "tiny", "prompt": "a", "best_of": 2}, "best_of", "best-of-2"),
    ("/v1/completions", {"model": "tiny", "prompt": "a", "echo": True}, "echo", "echo"),
    ("/v1/completions", {"model": "tiny", "prompt": "a", "presence_penalty": 0.5}, "presence_penalty", "presence"),
    ("/v1/completions", {"model": "tiny", "prompt": "a", "frequency_penalty": 1}, "frequency_penalty", "frequency"),
    ("/v1/completions", {"model": "tiny", "prompt": "a", "stop": 3}, "stop", "stop-number"),
    ("/v1/completions", {"model": "tiny", "prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, "stop", "five-stops"),
    ("/v1/completions", {"model": "tiny", "prompt": "a", "stream": "yes"}, "stream", "stream-string"),
    ("/v1/completions", {"prompt": "a"}, "model", "missing-model"),
    ("/v1/completions", {"model": "tiny"}, "prompt", "missing-prompt"),
    ("/v1/chat/completions", {"model": "tiny"}, "messages", "missing-messages"),
    ("/v1/chat/completions", {"model": "tiny", "messages": []}, "messages", "no-messages"),
    ("/v1/chat/completions", {"model": "tiny", "messages": "hi"}, "messages", "messages-string"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}, "role", "bad-role"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": 5}]}, "content", "bad-content"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "a"}], "n": 2}, "n", "chat-n-2"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "a"}], "logprobs": True,
                              "top_logprobs": 6}, "top_logprobs", "top-logprobs-6"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "a"}],
                              "max_completion_tokens": 0}, "max_completion_tokens", "max-completion-tokens-0"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "a"}],
                              "top_logprobs": 2}, "top_logprobs", "top-logprobs-without-logprobs"),
]


def _still_serves(setup: Setup) -> None:
    answer = setup.post("/v1/completions", {"model": "tiny", "prompt": "a", "max_tokens": 1})
    assert answer.status == 200 and answer.body["usage"]["completion_tokens"] == 1


@pytest.mark.parametrize("endpoint, body, names", [pytest.param(*case[:3], id=case[3]) for case in BAD])
def test_a_bad_request_is_400_naming_the_field(setup: Setup, endpoint: str, body: dict, names: str) -> None:
    variants = [body] if "stream" in body else [body, {**body, "stream": True}]  # refused before streaming
    for answer in (setup.post(endpoint, b) for b in variants):
        assert answer.status == 400, answer.body
        error = answer.error
        assert error["type"] == "invalid_request_error" and names in error["message"], error
    _still_serves(setup)


@pytest.mark.parametrize("raw, says", [
    pytest.param(b'{"model": "tiny", "prompt": ', "not valid JSON", id="truncated-json"),
    pytest.param(b"", "not valid JSON", id="empty-body"),
    pytest.param(b'["tiny"]', "JSON object", id="array-body"),
    pytest.param(b"\xff\xfe", "not valid JSON", id="not-utf8"),
])
def test_a_body_that_is_not_a_json_object_is_400(setup: Setup, raw: bytes, says: str) -> None:
    answer = setup.run(fetch(f"{setup.url}/v1/completions", raw=raw))
    assert answer.status == 400 and says in answer.error["message"]
    _still_serves(setup)


@pytest.mark.parametrize("model, says", [
    pytest.param("gpt-4", "is not served here", id="unknown"),
    pytest.param("layers-only", "MoE layers only", id="no-text-model"),
])
def test_an_unknown_model_is_404_naming_the_models_served(setup: Setup, model: str, says: str) -> None:
    for endpoint, body in (("/v1/completions", {"prompt": "a"}), ("/v1/chat/completions", {"messages": []})):
        error = setup.post(endpoint, {"model": model, **body}).error
        assert error["code"] == "model_not_found" and says in error["message"] and "'tiny'" in error["message"]
    assert setup.run(fetch(f"{setup.url}/v1/models/{model}", "GET")).status == 404


def test_unknown_paths_and_methods_are_error_objects(setup: Setup) -> None:
    missing = setup.run(fetch(f"{setup.url}/v1/embeddings", body={"model": "tiny"}))
    assert missing.status == 404 and missing.error["code"] == "unknown_url"
    wrong = setup.run(fetch(f"{setup.url}/v1/completions", "GET"))
    assert wrong.status == 405 and wrong.error["type"] == "invalid_request_error"


def test_a_model_that_is_not_ready_is_503(setup: Setup) -> None:
    answer = setup.post("/v1/completions", {"model": "cold", "prompt": "a"})
    assert answer.status == 503 and "not ready" in answer.error["message"]


# ---- the engine's limits and failures ------------------------------------------------------------


def _long(model: str = "held", stream: bool = True) -> dict:
    return {"model": model, "prompt": "the cat", "max_tokens": 40, "ignore_eos": True, "stream": stream}


async def _open_stream(url: str, body: dict) -> Callable[[], Awaitable[None]]:
    """A streaming call whose answer has begun (its headers are in); returns how to go away (close
    the connection without reading on)."""
    session = aiohttp.ClientSession()
    response = await session.post(url, json=body)
    assert response.status == 200 and response.headers["Content-Type"].startswith("text/event-stream")

    async def go_away() -> None:
        response.close()
        await session.close()

    return go_away


def test_a_full_queue_is_429_and_both_held_requests_finish(setup: Setup) -> None:
    engine = setup.held.text.engine
    setup.loop.call(setup.held_moe.hold)
    try:
        first = asyncio.run_coroutine_threadsafe(fetch(f"{setup.url}/v1/completions", body=_long(stream=False)),
                                                 setup.loop.loop)
        wait_for(setup, lambda: engine.stats()["running"] == 1, "the first request to run")
        second = asyncio.run_coroutine_threadsafe(fetch(f"{setup.url}/v1/completions", body=_long(stream=False)),
                                                  setup.loop.loop)
        wait_for(setup, lambda: engine.stats()["waiting"] == 1, "the second request to wait")
        refused = setup.post("/v1/completions", _long(stream=False))
        assert refused.status == 429 and refused.error["type"] == "rate_limit_error"
        assert "max_waiting" in refused.error["message"]
        refused_stream = setup.stream("/v1/chat/completions", {"model": "held", "messages": [
            {"role": "user", "content": "a"}]})
        assert refused_stream[0] == 429
    finally:
        setup.loop.call(setup.held_moe.release)
    assert first.result(60).status == 200 and second.result(60).status == 200
    assert "RESOURCE_EXHAUSTED" in setup.metrics.codes()
    wait_for(setup, lambda: engine_idle(setup.held.text), "the engine to be idle")


def test_a_client_that_goes_away_frees_its_sequence(setup: Setup) -> None:
    text = setup.held.text
    wait_for(setup, lambda: engine_idle(text), "the engine to be idle")
    cancelled_before = setup.metrics.codes().count("CANCELLED")
    setup.loop.call(setup.held_moe.hold)  # the engine cannot finish the request behind our back
    try:
        go_away = setup.run(_open_stream(f"{setup.url}/v1/completions", _long()))
        wait_for(setup, lambda: text.engine.stats()["running"] == 1, "the request to run")
        assert text.engine.stats()["kv_used_fraction"] > 0
        steps = text.engine.steps
        setup.run(go_away())
        wait_for(setup, lambda: setup.metrics.codes().count("CANCELLED") > cancelled_before,
                 "the server to notice the client went away")
    finally:
        setup.loop.call(setup.held_moe.release)
    wait_for(setup, lambda: engine_idle(text), "the sequence to be freed")
    assert text.engine.steps - steps <= 1, "the engine ran the request on after its client left"


def test_an_error_in_the_middle_of_a_stream_is_an_error_event(setup: Setup) -> None:
    setup.held_moe.failing = True
    try:
        status, _, events = setup.stream("/v1/chat/completions", {"model": "held", "messages": [
            {"role": "user", "content": "hi"}]})
        whole = setup.post("/v1/completions", {"model": "held", "prompt": "a"})
    finally:
        setup.held_moe.failing = False
    assert status == 200 and events[0]["choices"][0]["delta"]["role"] == "assistant"
    error = events[-1]["error"]
    assert "no live replica" in error["message"] and error["code"] == "unavailable"
    assert "[DONE]" not in events
    assert whole.status == 503 and "no live replica" in whole.error["message"]
    _still_serves(setup)


def test_an_unexpected_error_is_500_with_a_generic_message_and_logged(setup: Setup, caplog) -> None:
    setup.held_moe.broken = True
    try:
        whole = setup.post("/v1/completions", {"model": "held", "prompt": "a"})
        status, _, events = setup.stream("/v1/completions", {"model": "held", "prompt": "a"})
    finally:
        setup.held_moe.broken = False
    assert whole.status == 500 and whole.error["type"] == "server_error"
    assert "see the server log" in whole.error["message"] and "secret" not in whole.error["message"]
    assert status == 200 and events[-1]["error"]["code"] == "internal_error" and "secret" not in str(events)
    assert any("secret internals" in r.getMessage() or (r.exc_info and "secret" in str(r.exc_info[1]))
               for r in caplog.records if r.name == "router_service.openai_http")
    _still_serves(setup)


def test_every_request_is_counted_once_with_its_status(setup: Setup) -> None:
    before = len(setup.metrics.requests)
    ok = setup.post("/v1/completions", {"model": "tiny", "prompt": "a", "max_tokens": 2})
    setup.post("/v1/completions", {"model": "tiny", "prompt": "a", "max_tokens": 0})
    setup.post("/v1/completions", {"model": "nope", "prompt": "a"})
    setup.post("/v1/completions", {"model": "cold", "prompt": "a"})
    setup.stream("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "a"}],
                                          "max_tokens": 3})
    got = setup.metrics.requests[before:]
    assert [(m, c) for m, c, _, _ in got] == [("tiny", "OK"), ("tiny", "INVALID_ARGUMENT"), ("nope", "NOT_FOUND"),
                                               ("cold", "UNAVAILABLE"), ("tiny", "OK")]
    assert got[0][3] == ok.body["usage"]["total_tokens"] and all(latency >= 0 for _, _, latency, _ in got)


# ---- security and stopping ----------------------------------------------------------------------


def _tokens_file(tmp_path, name: str, token: str) -> str:
    path = tmp_path / name
    path.write_text(f"# tokens\n{token}\n")
    return str(path)


def test_tokens_are_needed_on_v1_but_not_on_health(setup: Setup, tmp_path) -> None:
    security = SecurityConfig(inference_tokens_file=_tokens_file(tmp_path, "inference", TOKEN),
                              admin_tokens_file=_tokens_file(tmp_path, "admin", ADMIN))
    server = setup.run(start_http_server({"tiny": setup.tiny}, "127.0.0.1", 0, security=security))
    url = f"http://127.0.0.1:{server.port}"
    try:
        setup.run(server.set_serving(True))
        body = {"model": "tiny", "prompt": "a", "max_tokens": 1}
        for headers, says in (({}, "Authorization: Bearer"), ({"Authorization": "Basic abc"}, "Bearer <token>"),
                              ({"Authorization": "Bearer wrong-token-0123456789"}, "not valid")):
            for path, method in (("/v1/completions", "POST"), ("/v1/models", "GET")):
                answer = setup.run(fetch(f"{url}{path}", method, body=body, headers=headers))
                assert answer.status == 401 and says in answer.error["message"], answer.body
                assert answer.error["type"] == "authentication_error"
        for token in (TOKEN, ADMIN):
            ok = setup.run(fetch(f"{url}/v1/completions", body=body, headers={"Authorization": f"Bearer {token}"}))
            assert ok.status == 200, ok.body
        assert setup.run(fetch(f"{url}/health", "GET")).status == 200
    finally:
        setup.run(server.stop(1.0))


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _client_tls(pki: Pki, certificate: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca_cert))
    if certificate:
        context.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    return context


def test_mutual_tls_needs_a_client_certificate_the_ca_signed(setup: Setup, pki: Pki) -> None:
    security = SecurityConfig(tls_cert_file=str(pki.server_cert), tls_key_file=str(pki.server_key),
                              tls_client_ca_file=str(pki.ca_cert))
    server = setup.run(start_http_server({"tiny": setup.tiny}, "127.0.0.1", 0, security=security))
    url = f"https://127.0.0.1:{server.port}"
    try:
        setup.run(server.set_serving(True))
        ok = setup.run(fetch(f"{url}/v1/models", "GET", ssl=_client_tls(pki, certificate=True)))
        assert ok.status == 200 and ok.body["data"][0]["id"] == "tiny"
        with pytest.raises((aiohttp.ClientError, ssl.SSLError, ConnectionError)):
            setup.run(fetch(f"{url}/v1/models", "GET", ssl=_client_tls(pki, certificate=False)))
        with pytest.raises(aiohttp.ClientError):
            setup.run(fetch(f"http://127.0.0.1:{server.port}/v1/models", "GET"))  # plaintext is not served
    finally:
        setup.run(server.stop(1.0))


def test_stop_refuses_new_requests_and_lets_those_in_flight_finish(setup: Setup) -> None:
    server = setup.run(start_http_server({"held": setup.held}, "127.0.0.1", 0))
    url = f"http://127.0.0.1:{server.port}"
    wait_for(setup, lambda: engine_idle(setup.held.text), "the engine to be idle")
    setup.loop.call(setup.held_moe.hold)
    try:
        in_flight = asyncio.run_coroutine_threadsafe(stream(f"{url}/v1/completions", _long()), setup.loop.loop)
        wait_for(setup, lambda: setup.held.text.engine.stats()["running"] == 1, "the request to run")
        stopping = asyncio.run_coroutine_threadsafe(server.stop(grace_s=30.0), setup.loop.loop)
        with pytest.raises(aiohttp.ClientError):  # the listening socket is closed
            setup.run(fetch(f"{url}/v1/completions", body=_long(stream=False)))
    finally:
        setup.loop.call(setup.held_moe.release)
    status, _, events = in_flight.result(60)
    assert status == 200 and events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] == 40
    stopping.result(30)


def test_parse_events_refuses_what_is_not_an_event() -> None:
    assert parse_events('data: {"a": 1}\n\ndata: [DONE]\n\n') == [{"a": 1}, "[DONE]"]
    with pytest.raises(AssertionError):
        parse_events("event: x\n\n")
