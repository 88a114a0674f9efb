"""KServe v2 request decoding and response encoding: good inputs in every wire datatype decode to
the right float32 values, and every bad input is INVALID_ARGUMENT with a message that says what
was expected and what came."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch

from cluster.model_spec import ModelSpec
from protos import grpc_predict_v2_pb2 as pb
from router_service.codec import decode_request, encode_tensor
from router_service.errors import InvalidRequest
from router_service.servicer import status_code

H = 4
SPEC = ModelSpec(
    hidden_size=H, intermediate_size=6, num_experts=4, top_k=2, moe_layers=(0, 1), num_hidden_layers=2
)
ONE_LAYER = ModelSpec(
    hidden_size=H, intermediate_size=6, num_experts=4, top_k=2, moe_layers=(3,), num_hidden_layers=4
)
GAPPY = ModelSpec(
    hidden_size=H, intermediate_size=6, num_experts=4, top_k=2, moe_layers=(1, 2, 3, 7),
    num_hidden_layers=8,
)  # fmt: skip


def values(tokens: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(tokens, H, generator=torch.Generator().manual_seed(seed))


def raw_bytes(x: torch.Tensor, datatype: str) -> bytes:
    """Little-endian wire bytes of `x` in `datatype`."""
    if datatype == "BF16":
        return x.to(torch.bfloat16).view(torch.int16).numpy().tobytes()
    dtype = {"FP32": torch.float32, "FP16": torch.float16, "INT32": torch.int32}[datatype]
    return x.to(dtype).numpy().tobytes()


def make_request(
    x: torch.Tensor | None = None,
    *,
    datatype: str = "FP32",
    shape: list[int] | None = None,
    raw: bytes | list[bytes] | None = None,
    typed: list[float] | None = None,
    layer: int | str | None = 0,
    name: str = "hidden_states",
    outputs: tuple[str, ...] = (),
) -> pb.ModelInferRequest:
    """One input tensor; raw bytes from `x` unless `raw` or `typed` say otherwise."""
    req = pb.ModelInferRequest(model_name="moe")
    tensor = req.inputs.add(name=name, datatype=datatype)
    tensor.shape.extend(shape if shape is not None else list(x.shape))
    if typed is not None:
        tensor.contents.fp32_contents.extend(typed)
    elif raw is not None:
        req.raw_input_contents.extend(raw if isinstance(raw, list) else [raw])
    elif x is not None:
        req.raw_input_contents.append(raw_bytes(x, datatype))
    if isinstance(layer, str):
        req.parameters["layer"].string_param = layer
    elif layer is not None:
        req.parameters["layer"].int64_param = layer
    for out in outputs:
        req.outputs.add(name=out)
    return req


def refused(request: pb.ModelInferRequest, spec: ModelSpec = SPEC) -> str:
    """Decode expecting INVALID_ARGUMENT; returns the message."""
    with pytest.raises(InvalidRequest) as info:
        decode_request(request, spec)
    assert status_code(info.value) == grpc.StatusCode.INVALID_ARGUMENT
    return str(info.value)


# ---------------------------------------------------------------------------------------------
# Good requests
# ---------------------------------------------------------------------------------------------


def test_fp32_raw() -> None:
    x = values()

    decoded = decode_request(make_request(x, layer=1), SPEC)

    torch.testing.assert_close(decoded.hidden, x, rtol=0, atol=0)
    assert decoded.hidden.dtype == torch.float32
    assert decoded.layer == 1
    assert decoded.wire_dtype == "FP32"
    assert decoded.outputs == ("hidden_states",)


def test_fp32_typed_contents() -> None:
    x = values(2)

    decoded = decode_request(make_request(shape=[2, H], typed=x.flatten().tolist()), SPEC)

    torch.testing.assert_close(decoded.hidden, x, rtol=0, atol=0)
    assert decoded.wire_dtype == "FP32"


@pytest.mark.parametrize(("datatype", "torch_dtype"), [("FP16", torch.float16), ("BF16", torch.bfloat16)])
def test_half_precision_raw_decodes_like_torch(datatype: str, torch_dtype: torch.dtype) -> None:
    x = values(5)

    decoded = decode_request(make_request(x, datatype=datatype), SPEC)

    torch.testing.assert_close(decoded.hidden, x.to(torch_dtype).float(), rtol=0, atol=0)
    assert decoded.hidden.dtype == torch.float32
    assert decoded.wire_dtype == datatype


def test_layer_defaults_on_a_one_layer_model() -> None:
    assert decode_request(make_request(values(), layer=None), ONE_LAYER).layer == 3


@pytest.mark.parametrize(
    ("kind", "value", "expected"),
    [
        pytest.param("int64_param", 1, 1, id="int64"),
        pytest.param("uint64_param", 1, 1, id="uint64"),
        pytest.param("string_param", "1", 1, id="string"),
        pytest.param("string_param", " 0 ", 0, id="string-with-spaces"),
    ],
)
def test_layer_parameter_forms(kind: str, value: object, expected: int) -> None:
    req = make_request(values(), layer=None)
    setattr(req.parameters["layer"], kind, value)

    assert decode_request(req, SPEC).layer == expected


def test_requested_outputs_keep_their_order() -> None:
    req = make_request(values(), outputs=("topk_ids", "hidden_states", "topk_weights"))

    assert decode_request(req, SPEC).outputs == ("topk_ids", "hidden_states", "topk_weights")


# ---------------------------------------------------------------------------------------------
# Bad tensors
# ---------------------------------------------------------------------------------------------


def test_wrong_hidden_size() -> None:
    x = torch.ones(2, H + 1)
    assert refused(make_request(x)) == (
        f"input 'hidden_states' shape must be [tokens, {H}], got [2, {H + 1}]"
    )


@pytest.mark.parametrize("shape", [[2 * H], [1, 2, H]], ids=["rank-1", "rank-3"])
def test_wrong_rank(shape: list[int]) -> None:
    req = make_request(shape=shape, raw=raw_bytes(torch.ones(2, H), "FP32"))
    assert refused(req) == f"input 'hidden_states' shape must be [tokens, {H}], got {shape}"


def test_wrong_dtype() -> None:
    req = make_request(torch.ones(2, H), datatype="INT32")
    assert refused(req) == (
        "input 'hidden_states' datatype must be one of FP32, FP16, BF16, got 'INT32'"
    )


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_values(bad: float) -> None:
    x = values(3)
    x[1, 2] = bad
    x[2, 0] = bad
    assert refused(make_request(x)) == (
        "input 'hidden_states' has 2 NaN/Inf values, first at [token 1, dim 2]"
    )


def test_fp16_overflow_inf_is_refused() -> None:
    # 1e5 does not fit in FP16: the client's own conversion made it Inf
    x = values(2)
    x[0, 0] = 1e5
    assert "NaN/Inf" in refused(make_request(x, datatype="FP16"))


def test_empty_batch() -> None:
    req = make_request(shape=[0, H], raw=b"")
    assert refused(req) == (
        f"input 'hidden_states' is an empty batch (shape [0, {H}]); send at least one token"
    )


def test_raw_length_mismatch() -> None:
    req = make_request(shape=[3, H], raw=raw_bytes(values(2), "FP32"))
    assert refused(req) == (
        f"input 'hidden_states' raw content is {2 * H * 4} bytes, but shape [3, {H}] of FP32 "
        f"needs {3 * H * 4} bytes"
    )


def test_raw_length_uses_the_datatype_item_size() -> None:
    # FP32 bytes of 1 token are exactly the FP16 bytes of 2 tokens
    assert decode_request(make_request(shape=[2, H], raw=raw_bytes(values(1), "FP32"),
                                       datatype="FP16"), SPEC).hidden.shape == (2, H)
    req = make_request(shape=[1, H], raw=raw_bytes(values(1), "FP32"), datatype="BF16")
    assert f"is {H * 4} bytes, but shape [1, {H}] of BF16 needs {H * 2} bytes" in refused(req)


def test_typed_count_mismatch() -> None:
    req = make_request(shape=[2, H], typed=[0.5] * (2 * H - 1))
    assert refused(req) == (
        f"input 'hidden_states' shape [2, {H}] needs {2 * H} fp32_contents values, got {2 * H - 1}"
    )


def test_fp16_typed_contents_must_be_raw() -> None:
    req = make_request(shape=[1, H], typed=[0.5] * H, datatype="FP16")
    assert refused(req) == (
        "input 'hidden_states' with datatype FP16 must be sent in raw_input_contents "
        "(the protocol has no typed field for it)"
    )


def test_no_data() -> None:
    req = make_request(shape=[1, H])
    assert refused(req) == "input 'hidden_states' has no data: set raw_input_contents or contents"


def test_two_raw_entries_for_one_input() -> None:
    one = raw_bytes(values(1), "FP32")
    assert refused(make_request(shape=[1, H], raw=[one, one])) == (
        "raw_input_contents has 2 entries for 1 input"
    )


# ---------------------------------------------------------------------------------------------
# Bad inputs list, parameters and outputs
# ---------------------------------------------------------------------------------------------


def test_missing_input() -> None:
    req = pb.ModelInferRequest(model_name="moe")
    assert refused(req) == "expected exactly one input named 'hidden_states', got no inputs"


def test_wrong_input_name() -> None:
    assert refused(make_request(values(), name="x")) == (
        "expected exactly one input named 'hidden_states', got ['x']"
    )


def test_two_inputs() -> None:
    req = make_request(values())
    req.inputs.add(name="hidden_states", datatype="FP32", shape=[1, H])
    assert refused(req) == (
        "expected exactly one input named 'hidden_states', got ['hidden_states', 'hidden_states']"
    )


def test_missing_layer_on_a_two_layer_model() -> None:
    assert refused(make_request(values(), layer=None)) == (
        "request parameter 'layer' is required: this model has 2 MoE layers (0-1)"
    )


@pytest.mark.parametrize(
    ("kind", "value", "shown"),
    [
        pytest.param("string_param", "one", "string_param 'one'", id="word"),
        pytest.param("string_param", "1.0", "string_param '1.0'", id="decimal-string"),
        pytest.param("double_param", 1.0, "double_param 1.0", id="double"),
        pytest.param("bool_param", True, "bool_param True", id="bool"),
        pytest.param("string_param", "--1", "string_param '--1'", id="double-minus-string"),
        pytest.param("string_param", "\u00b2", "string_param '\u00b2'", id="superscript-digit"),
    ],
)
def test_layer_not_an_integer(kind: str, value: object, shown: str) -> None:
    req = make_request(values(), layer=None)
    setattr(req.parameters["layer"], kind, value)
    assert refused(req) == f"request parameter 'layer' must be an integer, got {shown}"


def test_layer_empty_parameter() -> None:
    req = make_request(values(), layer=None)
    req.parameters["layer"].SetInParent()
    assert refused(req) == "request parameter 'layer' must be an integer, got an empty parameter"


@pytest.mark.parametrize(
    ("spec", "layer", "listed"),
    [
        pytest.param(SPEC, 2, "0-1", id="past-the-end"),
        pytest.param(SPEC, "-1", "0-1", id="negative-string"),
        pytest.param(GAPPY, 5, "1-3, 7", id="dense-layer-between-moe-layers"),
    ],
)
def test_unknown_layer_lists_valid_layers(spec: ModelSpec, layer: int | str, listed: str) -> None:
    message = refused(make_request(values(), layer=layer), spec)
    assert message == f"layer {int(layer)} is not an MoE layer of this model; valid layers: {listed}"


def test_unknown_requested_output() -> None:
    req = make_request(values(), outputs=("hidden_states", "logits"))
    assert refused(req) == (
        "unknown requested outputs ['logits']; this model offers "
        "['hidden_states', 'topk_ids', 'topk_weights']"
    )


# ---------------------------------------------------------------------------------------------
# encode_tensor
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("wire_dtype", "torch_dtype", "itemsize"),
    [("FP32", torch.float32, 4), ("FP16", torch.float16, 2), ("BF16", torch.bfloat16, 2),
     ("INT32", torch.int32, 4)],
)  # fmt: skip
def test_encode_tensor_roundtrip(wire_dtype: str, torch_dtype: torch.dtype, itemsize: int) -> None:
    value = values(3) * 100 if wire_dtype == "INT32" else values(3)

    tensor, raw = encode_tensor("hidden_states", value, wire_dtype)

    assert (tensor.name, tensor.datatype, list(tensor.shape)) == ("hidden_states", wire_dtype, [3, H])
    assert len(raw) == 3 * H * itemsize
    back = torch.frombuffer(bytearray(raw), dtype=torch_dtype).reshape(3, H)
    torch.testing.assert_close(back, value.to(torch_dtype), rtol=0, atol=0)


def test_encode_int64_ids_as_int32() -> None:
    ids = torch.tensor([[0, 7], [3, 1]], dtype=torch.int64)

    tensor, raw = encode_tensor("topk_ids", ids, "INT32")

    assert tensor.datatype == "INT32"
    np.testing.assert_array_equal(np.frombuffer(raw, dtype="<i4").reshape(2, 2), [[0, 7], [3, 1]])


@pytest.mark.parametrize("wire_dtype", ["FP32", "FP16", "BF16"])
def test_encoded_output_decodes_back(wire_dtype: str) -> None:
    x = values(4)
    tensor, raw = encode_tensor("hidden_states", x, wire_dtype)

    decoded = decode_request(make_request(shape=list(tensor.shape), raw=raw, datatype=wire_dtype), SPEC)

    expected = x.to({"FP32": torch.float32, "FP16": torch.float16, "BF16": torch.bfloat16}[wire_dtype])
    torch.testing.assert_close(decoded.hidden, expected.float(), rtol=0, atol=0)
