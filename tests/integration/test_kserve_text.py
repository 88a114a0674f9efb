"""Text generation over KServe v2 gRPC, as Triton serves LLMs, against the real stack: a tiny
checkpoint with its tokenizer, served on 2 workers, generates over `ModelInfer` (`text_input` ->
`text_output`) and over `ModelStreamInfer` (one response per piece, the last with
`triton_final_response`), and its greedy text equals `transformers`' own `generate` on the same
checkpoint. The layer API keeps working on the same server; a model without a text model refuses
text; the stock `tritonclient` streams the same text (in its own venv, `tests/triton_env.py`).
"""

from __future__ import annotations

import asyncio
import json
import struct
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch

from protos import grpc_predict_v2_pb2 as pb
from protos import grpc_predict_v2_pb2_grpc as pb_grpc
from router_service.client import build_request, parse_response
from router_service.servicer import InferenceServicer
from tests.integration.support import (
    FP32_REL_TOL,
    MARKS,
    Served,
    hidden_states,
    rel_err,
    run_on,
    serve_config,
    wait_until,
)
from tests.triton_env import ensure_triton_venv

transformers = pytest.importorskip("transformers")
from workers.tiny_models import BY_NAME  # after the skip: it needs transformers

pytestmark = MARKS

MODEL = "it-text"
REPO_ROOT = Path(__file__).resolve().parents[2]
STREAM_CHECK = REPO_ROOT / "tests" / "triton_stream_check.py"
FINAL = "triton_final_response"
NEW_TOKENS = 24  # the tiny models' context is 64 tokens
PROMPTS = ("quiet hills where", "hello world", "ran the and a rose")  # greedy outputs that are not one token repeated
EOS_PROMPT = "a"  # on the mixtral checkpoint, greedy decoding soon reaches end-of-sequence


@dataclass
class TextServed:
    """A served checkpoint that generates, with `transformers`' model and tokenizer of it."""

    served: Served
    hf: torch.nn.Module
    tokenizer: object

    @property
    def eos(self) -> int:
        return self.hf.config.eos_token_id

    def prompt_ids(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt).input_ids)

    def greedy_ids(self, prompt: str, new_tokens: int = NEW_TOKENS, ignore_eos: bool = True) -> list[int]:
        """`generate(do_sample=False)`'s new tokens; without `ignore_eos`, up to the first end-of-sequence."""
        ids = torch.tensor([self.prompt_ids(prompt)])
        with torch.no_grad():
            out = self.hf.generate(ids, do_sample=False, max_new_tokens=new_tokens)[0, ids.shape[1]:].tolist()
        if not ignore_eos and self.eos in out:
            out = out[:out.index(self.eos) + 1]
        return out

    def text(self, prompt: str, token_ids: list[int]) -> str:
        """The text of new tokens after `prompt`, decoded with the checkpoint's tokenizer
        (`skip_special_tokens`) in the prompt's context: a tokenizer that drops a leading space
        at the start of a decode (Metaspace, SentencePiece) keeps it after the prompt, as the
        server's incremental detokenizer does (and vLLM's)."""
        before = self.tokenizer.decode(self.prompt_ids(prompt), skip_special_tokens=True)
        whole = self.tokenizer.decode(self.prompt_ids(prompt) + token_ids, skip_special_tokens=True)
        assert whole.startswith(before), f"decoding the new tokens changed the prompt's text: {before!r} -> {whole!r}"
        return whole[len(before):]

    def greedy_text(self, prompt: str, new_tokens: int = NEW_TOKENS, ignore_eos: bool = True) -> str:
        return self.text(prompt, self.greedy_ids(prompt, new_tokens, ignore_eos))


def text_config(name: str, checkpoint: Path):
    return serve_config(name, checkpoint=str(checkpoint), workers=2, router={"http_port": None}).with_overrides(
        **{"generation.kv_cache_mb": 8})


def serve_text(deploy_served, tmp_path_factory, family: str, name: str) -> TextServed:
    path = tmp_path_factory.mktemp(name)
    hf = BY_NAME[family].save(path).eval()
    hf.generation_config.eos_token_id = None  # `greedy_ids` cuts at end-of-sequence itself
    start, _ = deploy_served
    served = start(text_config(name, path))
    return TextServed(served, hf, transformers.AutoTokenizer.from_pretrained(path))


@pytest.fixture(scope="module")
def text_served(deploy_served, tmp_path_factory) -> Iterator[TextServed]:
    served = serve_text(deploy_served, tmp_path_factory, "mixtral", MODEL)
    yield served
    deploy_served[1](served.served)


@pytest.fixture(scope="module")
def stub(text_served: TextServed) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(text_served.served.address) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def text_request(prompt: str, request_id: str = "", model: str = MODEL, **parameters) -> pb.ModelInferRequest:
    """A text request as tritonclient sends it: a length-prefixed raw BYTES element."""
    request = pb.ModelInferRequest(model_name=model, id=request_id)
    request.inputs.add(name="text_input", datatype="BYTES", shape=[1])
    data = prompt.encode()
    request.raw_input_contents.append(struct.pack("<I", len(data)) + data)
    for name, value in parameters.items():
        param = request.parameters[name]
        if isinstance(value, str):
            param.string_param = value
        elif isinstance(value, bool):
            param.bool_param = value
        elif isinstance(value, int):
            param.int64_param = value
        else:
            param.double_param = value
    return request


def greedy(prompt: str, request_id: str = "", new_tokens: int = NEW_TOKENS, **more) -> pb.ModelInferRequest:
    return text_request(prompt, request_id, max_tokens=new_tokens, temperature=0.0, ignore_eos=True, **more)


def output_text(response: pb.ModelInferResponse) -> str:
    (tensor,) = response.outputs
    assert (tensor.name, tensor.datatype, list(tensor.shape)) == ("text_output", "BYTES", [1])
    raw = response.raw_output_contents[0]
    (length,) = struct.unpack_from("<I", raw)
    assert len(raw) == 4 + length, f"text_output holds {len(raw)} bytes for one element of {length}"
    return raw[4:].decode()


def param(response: pb.ModelInferResponse, name: str):
    value = response.parameters[name]
    return getattr(value, value.WhichOneof("parameter_choice"))


def stream(stub, requests: list[pb.ModelInferRequest], timeout_s: float = 60.0) -> list[pb.ModelStreamInferResponse]:
    """Send `requests` on one stream, close our side, and read every response."""
    return list(stub.ModelStreamInfer(iter(requests), timeout=timeout_s))


# ---- the text equals transformers' ---------------------------------------------------------------


@pytest.mark.parametrize("prompt", PROMPTS[:2])
def test_greedy_text_equals_transformers_generate(text_served: TextServed, stub, prompt: str) -> None:
    want = text_served.greedy_ids(prompt)
    assert len(set(want)) > 3, "a repeated token would prove little: pick another prompt"

    response = stub.ModelInfer(greedy(prompt, "u1"), timeout=60)

    assert output_text(response) == text_served.text(prompt, want)
    alone = text_served.tokenizer.decode(want, skip_special_tokens=True)  # decoded alone: maybe without the leading space
    assert output_text(response).lstrip(" ") == alone.lstrip(" ")
    assert response.id == "u1" and response.model_name == MODEL
    assert param(response, "prompt_tokens") == len(text_served.prompt_ids(prompt))
    assert param(response, "completion_tokens") == NEW_TOKENS
    assert param(response, "finish_reason") == "length"
    assert FINAL not in response.parameters  # a unary answer is whole


def test_end_of_sequence_ends_the_text_unless_ignored(text_served: TextServed, stub) -> None:
    want = text_served.greedy_ids(EOS_PROMPT, ignore_eos=False)
    assert want[-1] == text_served.eos and len(want) < NEW_TOKENS, "the case must reach end-of-sequence"

    response = stub.ModelInfer(text_request(EOS_PROMPT, max_tokens=NEW_TOKENS, temperature=0), timeout=60)

    assert output_text(response) == text_served.text(EOS_PROMPT, want)
    assert param(response, "completion_tokens") == len(want)
    assert param(response, "finish_reason") == "stop"
    past = stub.ModelInfer(greedy(EOS_PROMPT), timeout=60)
    assert param(past, "completion_tokens") == NEW_TOKENS
    assert output_text(past) == text_served.greedy_text(EOS_PROMPT)


def test_streamed_pieces_concatenate_to_the_greedy_text(text_served: TextServed, stub) -> None:
    prompt = PROMPTS[0]

    responses = stream(stub, [greedy(prompt, "s1")])

    assert [r.error_message for r in responses] == [""] * len(responses)
    answers = [r.infer_response for r in responses]
    assert len(answers) == NEW_TOKENS, "one response per generated token"
    assert "".join(output_text(a) for a in answers) == text_served.greedy_text(prompt)
    assert {a.id for a in answers} == {"s1"}
    assert [param(a, FINAL) for a in answers] == [False] * (NEW_TOKENS - 1) + [True]
    assert [param(a, "completion_tokens") for a in answers] == list(range(1, NEW_TOKENS + 1))
    assert param(answers[-1], "finish_reason") == "length"
    assert all("finish_reason" not in a.parameters for a in answers[:-1])


def test_requests_on_one_stream_are_served_concurrently(text_served: TextServed, stub) -> None:
    requests = [greedy(prompt, f"c{i}") for i, prompt in enumerate(PROMPTS)]

    responses = stream(stub, requests)

    order = [r.infer_response.id for r in responses]
    for i, prompt in enumerate(PROMPTS):
        mine = [r.infer_response for r in responses if r.infer_response.id == f"c{i}"]
        assert "".join(output_text(a) for a in mine) == text_served.greedy_text(prompt), prompt
        assert param(mine[-1], FINAL) is True
    last_of_first = len(order) - 1 - order[::-1].index("c0")
    assert order.index("c1") < last_of_first, f"the requests were served one after another: {order}"


# ---- refusals -------------------------------------------------------------------------------------


@pytest.mark.parametrize("parameters, words", [
    pytest.param(dict(max_tokens="many"), ["'max_tokens' must be an integer", "'many'"], id="max-tokens-word"),
    pytest.param(dict(temperature=-0.5), ["temperature must be >= 0"], id="negative-temperature"),
    pytest.param(dict(stop=3), ["'stop' must be a string"], id="stop-int"),
    pytest.param(dict(ignore_eos="maybe"), ["'ignore_eos' must be a boolean"], id="ignore-eos-word"),
    pytest.param(dict(max_token=4), ["unknown request parameters ['max_token']"], id="typo"),
    pytest.param(dict(max_tokens=500), ["max_tokens (500)", "context of 64 tokens"], id="beyond-the-context"),
])
def test_a_bad_parameter_is_invalid_argument_naming_it(stub, parameters: dict, words: list[str]) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(text_request("the cat", **parameters), timeout=30)

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert all(w in caught.value.details() for w in words), caught.value.details()


def test_a_bad_request_on_a_stream_is_an_error_response_and_the_stream_goes_on(text_served: TextServed, stub) -> None:
    responses = stream(stub, [text_request("the cat", "bad", top_p=2.0), greedy(PROMPTS[1], "good", new_tokens=4)])

    bad = [r for r in responses if r.infer_response.id == "bad"]
    good = [r for r in responses if r.infer_response.id == "good"]
    assert len(bad) == 1 and bad[0].error_message.startswith("INVALID_ARGUMENT: "), bad
    assert "top_p must be in (0, 1], got 2.0" in bad[0].error_message
    assert param(bad[0].infer_response, FINAL) is True
    assert "".join(output_text(r.infer_response) for r in good) == text_served.greedy_text(PROMPTS[1], new_tokens=4)


def test_a_message_that_does_not_parse_ends_the_stream_invalid_argument(text_served: TextServed) -> None:
    with grpc.insecure_channel(text_served.served.address) as channel:
        call = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer",
                                     request_serializer=None, response_deserializer=pb.ModelStreamInferResponse.FromString)
        with pytest.raises(grpc.RpcError) as caught:
            list(call(iter([b"\xff"]), timeout=30))

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid inference.ModelInferRequest protobuf" in caught.value.details()


def test_a_model_that_serves_layers_only_refuses_text(main_server: Served) -> None:
    with grpc.insecure_channel(main_server.address) as channel:
        layers_only = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            layers_only.ModelInfer(text_request("the cat", model=main_server.name), timeout=30)
        responses = stream(layers_only, [text_request("the cat", "t1", model=main_server.name)])
        meta = layers_only.ModelMetadata(pb.ModelMetadataRequest(name=main_server.name), timeout=10)

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "does not generate text (it serves MoE layers only)" in caught.value.details()
    (only,) = responses
    assert only.error_message.startswith("INVALID_ARGUMENT: ") and "does not generate text" in only.error_message
    assert only.infer_response.id == "t1"
    assert meta.parameters["generates_text"].bool_param is False
    assert [t.name for t in meta.inputs] == ["hidden_states"]


# ---- beside the layer API -------------------------------------------------------------------------


def test_the_layer_api_still_works_on_the_text_server(text_served: TextServed, stub) -> None:
    served = text_served.served
    layer = served.spec.moe_layers[-1]
    x = hidden_states(5, served.spec.hidden_size, seed=3)
    served.assert_serves_correctly(layer, x)

    (only,) = stream(stub, [build_request(MODEL, x, layer)])  # a layer request on the stream: one answer

    assert only.error_message == ""
    want, _, _ = served.expected(layer, x)
    assert rel_err(parse_response(only.infer_response).hidden_states, want) < FP32_REL_TOL


def test_model_metadata_lists_the_text_tensors_beside_the_layer_api(text_served: TextServed, stub) -> None:
    meta = stub.ModelMetadata(pb.ModelMetadataRequest(name=MODEL), timeout=10)

    hidden = text_served.served.spec.hidden_size
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("hidden_states", "FP32", [-1, hidden]), ("text_input", "BYTES", [1])]
    assert [t.name for t in meta.outputs] == ["hidden_states", "topk_ids", "topk_weights", "text_output"]
    assert meta.parameters["generates_text"].bool_param is True
    assert meta.parameters["max_model_len"].int64_param == 64


# ---- cancellation and counting ------------------------------------------------------------------


def test_closing_the_stream_cancels_the_generation(text_served: TextServed, stub) -> None:
    engine = text_served.served.deployment.router.text.engine
    steps_before = engine.steps
    new_tokens = 64 - len(text_served.prompt_ids(PROMPTS[0]))  # the whole context: many steps to run
    client_done = threading.Event()

    def requests():
        yield greedy(PROMPTS[0], "x", new_tokens=new_tokens)
        client_done.wait(60)  # keep our side open: only the cancel ends the stream

    call = stub.ModelStreamInfer(requests(), timeout=60)
    first = next(call)
    call.cancel()
    client_done.set()

    assert first.infer_response.id == "x" and param(first.infer_response, FINAL) is False

    def idle() -> bool:
        stats = engine.stats()
        return (stats["running"], stats["waiting"], engine.allocator.free) == (0, 0, engine.allocator.num_blocks)

    wait_until(idle, timeout_s=30, what="the engine to drop the cancelled sequence and free its KV blocks")
    assert engine.steps - steps_before < new_tokens, "the generation ran to its end: it was not cancelled"


class RecordedMetrics:
    """A `RequestMetrics` that keeps what it is told."""

    def __init__(self):
        self.requests: list[tuple[str, str, int]] = []

    def record_request(self, model: str, code: str, latency_s: float, tokens: int) -> None:
        self.requests.append((model, code, tokens))

    def queue(self, model: str, tokens: int) -> None:
        pass


def test_each_streamed_request_is_counted(text_served: TextServed, server_loop) -> None:
    metrics = RecordedMetrics()
    servicer = InferenceServicer({MODEL: text_served.served.deployment.router}, metrics)

    async def requests():
        yield greedy(PROMPTS[0], "m1", new_tokens=5)
        yield text_request("the cat", "m2", max_tokens=0)
        yield text_request("the cat", "m3", model="nope")

    async def run() -> list:
        return [r async for r in servicer.ModelStreamInfer(requests(), None)]

    responses = run_on(server_loop, asyncio.wait_for(run(), 60))

    assert len(responses) == 5 + 2
    assert sorted(metrics.requests) == sorted([(MODEL, "OK", 5), (MODEL, "INVALID_ARGUMENT", 0),
                                               ("nope", "NOT_FOUND", 0)])


# ---- a model with shared experts ----------------------------------------------------------------


def test_a_shared_expert_model_generates_the_transformers_text(deploy_served, tmp_path_factory) -> None:
    shared = serve_text(deploy_served, tmp_path_factory, "qwen2-shared-expert", "it-text-shared")
    try:
        assert shared.served.spec.num_shared_experts > 0
        prompt = PROMPTS[1]
        want = shared.greedy_text(prompt)
        with grpc.insecure_channel(shared.served.address) as channel:
            qwen = pb_grpc.GRPCInferenceServiceStub(channel)
            whole = qwen.ModelInfer(greedy(prompt, model="it-text-shared"), timeout=60)
            pieces = stream(qwen, [greedy(prompt, "q", model="it-text-shared")])
    finally:
        deploy_served[1](shared.served)

    assert output_text(whole) == want
    assert "".join(output_text(r.infer_response) for r in pieces) == want
    assert param(pieces[-1].infer_response, FINAL) is True


# ---- the stock Triton client --------------------------------------------------------------------


@pytest.fixture(scope="module")
def triton_python() -> Path:
    return ensure_triton_venv(REPO_ROOT)  # built once (needs PyPI), reused afterwards


def run_stream_check(python: Path, served: Served, prompt: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), str(STREAM_CHECK), "--url", served.address, "--model", served.name,
                           "--prompt", prompt, "--timeout-s", "60", *args],
                          capture_output=True, text=True, timeout=180, check=False)


def test_stock_tritonclient_streams_the_greedy_text(triton_python: Path, text_served: TextServed) -> None:
    prompt = PROMPTS[2]

    done = run_stream_check(triton_python, text_served.served, prompt, "--max-tokens", str(NEW_TOKENS),
                            "--temperature", "0", "--ignore-eos")

    assert done.returncode == 0, f"triton_stream_check exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["text"] == text_served.greedy_text(prompt)
    assert len(report["pieces"]) == NEW_TOKENS
    assert set(report["ids"]) == {"stream-check-1"}
    assert report["last_parameters"][FINAL] is True
    assert report["last_parameters"]["finish_reason"] == "length"
    assert report["last_parameters"]["completion_tokens"] == NEW_TOKENS


def test_stock_tritonclient_sees_a_bad_parameter_as_an_error(triton_python: Path, text_served: TextServed) -> None:
    done = run_stream_check(triton_python, text_served.served, "the cat", "--param", 'max_tokens="many"')

    assert done.returncode == 1, done.stdout + done.stderr
    assert "triton_stream_check: FAILED" in done.stderr
    assert "INVALID_ARGUMENT" in done.stderr and "'max_tokens' must be an integer" in done.stderr, done.stderr
