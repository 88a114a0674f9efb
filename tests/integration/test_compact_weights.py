"""Compact expert weights served for real (Ray workers, the gRPC router): checkpoints saved by
`transformers` itself in BF16, and FP8-block checkpoints written with DeepSeek-V3's tensor names
and scale shapes (`TinyFamily.save_fp8`).

- BF16: the workers hold BF16 (their bytes are the BF16 bytes), compute in the `auto` dtype
  (BF16 on this project's CPUs), and the served layer equals the family's own `transformers`
  MoE block run in BF16, within BF16 tolerance; `moe-serve verify` (float32 math over the BF16
  weights) equals the float32 model loaded from the same checkpoint.
- FP8: the workers hold FP8 plus scales and, computing in float32, equal the
  dequantize-then-compute float32 reference to float32 rounding; `status` shows their bytes;
  likewise compressed-tensors' FP8 layout with a scale per row (GLM-4.5-FP8).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import ray
import torch

from cluster.app.verify import serve_and_verify
from tests.integration.support import (
    BF16_REL_TOL,
    FP32_REL_TOL,
    MARKS,
    Served,
    hidden_states,
    rel_err,
    run_on,
    serve_config,
)
from workers.precision import cpu_flags, native_bf16
from workers.tiny_models import BY_NAME

pytestmark = MARKS
pytest.importorskip("transformers")

BF16_CASES = ("mixtral", "qwen2-shared-expert", "deepseek-v3")


@pytest.fixture(scope="module", params=BF16_CASES)
def bf16_family(request, deploy_served, tmp_path_factory) -> Iterator[tuple[str, Served, torch.nn.Module]]:
    case = BY_NAME[request.param]
    path = tmp_path_factory.mktemp(f"bf16-{case.name}")
    model = case.save(path, dtype=torch.bfloat16)
    start, stop = deploy_served
    served = start(serve_config(f"it-bf16-{case.name}", checkpoint=str(path), workers=2))
    yield str(path), served, model
    stop(served)


def _expert_bytes(served: Served, itemsize: float, scale_bytes: int = 0) -> int:
    spec = served.spec
    return round(spec.num_logical_experts * 3 * spec.hidden_size * spec.intermediate_size * itemsize) + scale_bytes


def test_bf16_experts_stay_bf16_in_the_workers(bf16_family) -> None:
    _, served, _ = bf16_family
    assert served.spec.expert_dtype == "bfloat16"
    infos = ray.get([h.ready.remote() for h in served.deployment.pool.handles])
    assert {i["expert_dtype"] for i in infos} == {"bfloat16"}
    auto = "bfloat16" if native_bf16(cpu_flags()) else "float32"  # BF16 on a CPU with AMX / AVX512-BF16 (README)
    assert {i["compute_dtype"] for i in infos} == {auto}
    held = sum(s["weight_bytes"] for s in served.deployment.pool.stats())
    assert held == _expert_bytes(served, 2), "one replica of each expert, 2 bytes a value"


@pytest.mark.parametrize("tokens", [7, 64])
def test_bf16_served_layer_equals_the_family_block_in_bf16(bf16_family, tokens: int) -> None:
    _, served, model = bf16_family
    for layer in served.spec.moe_layers:
        x = hidden_states(tokens, served.spec.hidden_size, seed=100 + layer + tokens)
        got = served.client.infer(served.name, x, layer=layer, topk=True, timeout_s=60)
        block = model.model.layers[layer].mlp
        with torch.no_grad():
            want = block(torch.from_numpy(x).to(torch.bfloat16).unsqueeze(0)).squeeze(0).float()
        # the gate runs in float32 on the router, in BF16 in transformers: a near tie may pick
        # another expert for a token; those tokens are left out, and there must be few
        ids = torch.from_numpy(got.topk_ids.astype("int64")).sort(-1).values
        _, _, hf_ids = block.gate(torch.from_numpy(x).to(torch.bfloat16))
        same = (ids == hf_ids.sort(-1).values).all(-1)
        assert same.float().mean() >= 0.9, f"layer {layer}: routing agrees on only {same.float().mean():.0%}"
        err = rel_err(got.hidden_states[same.numpy()], want[same])
        assert err < BF16_REL_TOL, f"layer {layer}: relative error {err:.2e}"
        assert err > 0 or tokens < 2, "BF16 math differs from float32 at least a little"


def test_verify_passes_on_the_bf16_checkpoint(bf16_family, server_loop) -> None:
    path, served, _ = bf16_family
    from cluster.app.verify import load_hf_model

    model = load_hf_model(path)  # float32, from the BF16 weights
    report = run_on(server_loop, serve_and_verify(path, model, served.spec, workers=1, name="it-bf16-verify",
                                                  new_tokens=6, prompt_tokens=5, batch=2), timeout_s=300)
    assert report.ok and report.tokens_equal, report.to_dict()


@pytest.fixture(scope="module")
def fp8_served(deploy_served, tmp_path_factory) -> Iterator[Served]:
    path = tmp_path_factory.mktemp("fp8-deepseek-v3")
    BY_NAME["deepseek-v3"].save_fp8(path, block=(16, 16))
    start, stop = deploy_served
    config = serve_config("it-fp8", checkpoint=str(path), workers=2).with_overrides(**{"workers.compute_dtype": "float32"})
    served = start(config)
    yield served
    stop(served)


@pytest.mark.parametrize("tokens", [1, 33, 200])
def test_fp8_served_layer_equals_the_dequantized_reference(fp8_served: Served, tokens: int) -> None:
    assert fp8_served.spec.expert_dtype == "fp8"
    for layer in fp8_served.spec.moe_layers:
        fp8_served.assert_serves_correctly(layer, hidden_states(tokens, fp8_served.spec.hidden_size, seed=tokens + layer))
    x = hidden_states(16, fp8_served.spec.hidden_size, seed=3)
    got = fp8_served.client.infer(fp8_served.name, x, layer=1, timeout_s=60).hidden_states
    want, _, _ = fp8_served.expected(1, x)
    assert rel_err(got, want) < FP32_REL_TOL


def test_fp8_workers_hold_fp8_bytes_and_status_shows_them(fp8_served: Served, server_loop) -> None:
    spec = fp8_served.spec
    hidden, inter = spec.hidden_size, spec.intermediate_size
    scales = 2 * (-(-inter // 16)) * (-(-hidden // 16)) + (-(-hidden // 16)) * (-(-inter // 16))  # w1, w3; w2
    want = _expert_bytes(fp8_served, 1, spec.num_logical_experts * 4 * scales)
    status = run_on(server_loop, fp8_served.deployment.plane.status())
    held = [w["weight_bytes"] for w in status["workers"]]
    assert sum(held) == want and all(h > 0 for h in held), held
    from rich.console import Console

    from cluster.app.console import worker_load_table

    console = Console(width=160, record=True)
    console.print(worker_load_table(status["workers"]))
    text = console.export_text()
    assert "weights" in text and "KiB" in text, text


def test_an_fp8_layer_in_bf16_math_stays_within_bf16_of_the_reference(fp8_served: Served, deploy_served) -> None:
    """The same FP8 checkpoint with the math in BF16: dequantized to BF16 per expert."""
    start, stop = deploy_served
    config = fp8_served.config.with_overrides(**{"model.name": "it-fp8-bf16", "workers.compute_dtype": "bfloat16"})
    bf16 = start(config)
    try:
        x = hidden_states(48, bf16.spec.hidden_size, seed=9)
        got = bf16.client.infer(bf16.name, x, layer=2, timeout_s=60).hidden_states
        want, _, _ = fp8_served.expected(2, x)
        assert FP32_REL_TOL < rel_err(got, want) < BF16_REL_TOL
    finally:
        stop(bf16)


def test_a_compressed_tensors_fp8_checkpoint_is_served_as_the_dequantized_reference(deploy_served, tmp_path) -> None:
    """GLM-4.5-FP8's layout (compressed-tensors, float-quantized, a scale per row, static input
    scales): workers hold FP8 plus per-row scales and equal the float32 reference."""
    BY_NAME["glm4-moe"].save_fp8(tmp_path / "glm", block=(16, 16), strategy="channel")
    start, stop = deploy_served
    config = serve_config("it-fp8-ct", checkpoint=str(tmp_path / "glm"), workers=2).with_overrides(
        **{"workers.compute_dtype": "float32"})
    served = start(config)
    try:
        assert served.spec.expert_dtype == "fp8"
        for tokens, layer in ((1, served.spec.moe_layers[0]), (40, served.spec.moe_layers[-1])):
            served.assert_serves_correctly(layer, hidden_states(tokens, served.spec.hidden_size, seed=tokens))
        spec = served.spec
        per_row_scales = 4 * (2 * spec.intermediate_size + spec.hidden_size)  # float32 [F, 1] x 2 and [H, 1]
        held = sum(s["weight_bytes"] for s in served.deployment.pool.stats())
        assert held == _expert_bytes(served, 1, spec.num_logical_experts * per_row_scales)
    finally:
        stop(served)
