"""Talk to a running moe-serve server with the stock Triton gRPC client, unchanged.

Run with the python of the separate client venv (see ``tests/triton_env.py``), never with the
project's own environment (the stock client needs protobuf < 7)::

    .venv-triton/bin/python tests/triton_check.py --url 127.0.0.1:PORT --model NAME \\
        --hidden H --layer L --input in.npy --output out.npy

It calls ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata and ModelInfer
(input ``hidden_states`` FP32 ``[tokens, hidden]`` with request parameter ``layer``; outputs
``hidden_states`` and ``topk_ids``), writes the returned hidden states to ``--output`` and prints
one JSON line. Any failure, including a server that is not live or ready, prints a message that
starts with ``triton_check: FAILED`` to stderr and exits 1; bad arguments exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

try:
    import tritonclient.grpc as triton_grpc
    from tritonclient.utils import InferenceServerException
except ImportError as exc:  # wrong interpreter: say which one to use
    sys.exit(
        f"triton_check: FAILED: cannot import tritonclient ({exc}); run this script with the "
        "python that tests/triton_env.py:ensure_triton_venv returns (.venv-triton/bin/python)"
    )

INPUT_NAME = "hidden_states"
OUTPUT_NAMES = ("hidden_states", "topk_ids")


class CheckFailed(Exception):
    """The server answered, but not as a KServe v2 MoE server should."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Check a moe-serve server with the stock tritonclient.")
    parser.add_argument("--url", required=True, help="host:port of the gRPC server, e.g. 127.0.0.1:8001")
    parser.add_argument("--model", required=True, help="model name to query")
    parser.add_argument("--hidden", type=int, required=True, help="hidden size H; input must be [tokens, H]")
    parser.add_argument("--layer", type=int, required=True, help="MoE layer index, sent as request parameter")
    parser.add_argument("--input", type=Path, required=True, help=".npy file with FP32 hidden states [tokens, H]")
    parser.add_argument("--output", type=Path, required=True, help=".npy file to write output hidden states to")
    parser.add_argument("--timeout-s", type=float, default=60.0, help="per-call client deadline in seconds")
    args = parser.parse_args(argv)
    if args.hidden <= 0:
        parser.error(f"--hidden must be positive, got {args.hidden}")
    if args.layer < 0:
        parser.error(f"--layer must be >= 0, got {args.layer}")
    return args


def load_hidden_states(path: Path, hidden: int) -> np.ndarray:
    """Read the input; returns FP32 ``[tokens, hidden]``, C-contiguous."""
    array = np.load(path, allow_pickle=False)
    if array.dtype != np.float32:
        raise CheckFailed(f"{path} holds {array.dtype}, expected float32")
    if array.ndim != 2 or array.shape[1] != hidden:
        raise CheckFailed(f"{path} has shape {list(array.shape)}, expected [tokens, {hidden}]")
    return np.ascontiguousarray(array)


def _tensor_list(tensors: Any) -> list[dict[str, Any]]:
    return [{"name": t.name, "datatype": t.datatype, "shape": [int(d) for d in t.shape]} for t in tensors]


def check_health(client: Any, model: str, timeout_s: float) -> dict[str, bool]:
    """Live, ready and model-ready flags; raises CheckFailed unless all are true."""
    health = {
        "live": client.is_server_live(client_timeout=timeout_s),
        "ready": client.is_server_ready(client_timeout=timeout_s),
        "model_ready": client.is_model_ready(model, client_timeout=timeout_s),
    }
    if not all(health.values()):
        raise CheckFailed(f"server is not healthy: {health}")
    return health


def check_metadata(client: Any, model: str, hidden: int, timeout_s: float) -> dict[str, Any]:
    """Server and model metadata; raises CheckFailed if the model lacks the MoE tensors."""
    server = client.get_server_metadata(client_timeout=timeout_s)
    meta = client.get_model_metadata(model, client_timeout=timeout_s)
    inputs, outputs = _tensor_list(meta.inputs), _tensor_list(meta.outputs)
    input_by_name = {t["name"]: t for t in inputs}
    if INPUT_NAME not in input_by_name:
        raise CheckFailed(f"model metadata lists no input {INPUT_NAME!r}: {inputs}")
    last_dim = input_by_name[INPUT_NAME]["shape"][-1:]
    if last_dim not in ([hidden], [-1]):
        raise CheckFailed(f"metadata input shape {input_by_name[INPUT_NAME]['shape']} does not end in {hidden}")
    missing = set(OUTPUT_NAMES) - {t["name"] for t in outputs}
    if missing:
        raise CheckFailed(f"model metadata lacks outputs {sorted(missing)}: {outputs}")
    return {
        "server_name": server.name,
        "server_version": server.version,
        "server_extensions": list(server.extensions),
        "model_name": meta.name,
        "model_platform": meta.platform,
        "model_inputs": inputs,
        "model_outputs": outputs,
    }


def run_infer(
    client: Any, model: str, layer: int, hidden_states: np.ndarray, timeout_s: float
) -> tuple[np.ndarray, np.ndarray]:
    """One ModelInfer call; returns (hidden_states [tokens, H], topk_ids [tokens, k])."""
    infer_input = triton_grpc.InferInput(INPUT_NAME, list(hidden_states.shape), "FP32")
    infer_input.set_data_from_numpy(hidden_states)
    outputs = [triton_grpc.InferRequestedOutput(name) for name in OUTPUT_NAMES]
    result = client.infer(
        model, [infer_input], outputs=outputs, parameters={"layer": layer}, client_timeout=timeout_s
    )
    out_hidden, topk_ids = result.as_numpy("hidden_states"), result.as_numpy("topk_ids")
    if out_hidden is None or topk_ids is None:
        raise CheckFailed(f"response lacks an output: got {[o.name for o in result.get_response().outputs]}")
    if out_hidden.shape != hidden_states.shape:
        raise CheckFailed(f"output hidden_states shape {list(out_hidden.shape)} != input {list(hidden_states.shape)}")
    if topk_ids.ndim != 2 or topk_ids.shape[0] != hidden_states.shape[0]:
        raise CheckFailed(f"topk_ids shape {list(topk_ids.shape)} is not [{hidden_states.shape[0]}, k]")
    return out_hidden, topk_ids


def run_check(args: argparse.Namespace) -> dict[str, Any]:
    hidden_states = load_hidden_states(args.input, args.hidden)
    client = triton_grpc.InferenceServerClient(url=args.url)
    try:
        report: dict[str, Any] = dict(check_health(client, args.model, args.timeout_s))
        report.update(check_metadata(client, args.model, args.hidden, args.timeout_s))
        out_hidden, topk_ids = run_infer(client, args.model, args.layer, hidden_states, args.timeout_s)
    finally:
        client.close()
    np.save(args.output, out_hidden)
    report["hidden_states_shape"] = list(out_hidden.shape)
    report["topk_ids_shape"] = list(topk_ids.shape)
    report["topk_ids_dtype"] = str(topk_ids.dtype)
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = run_check(args)
    except InferenceServerException as exc:
        print(f"triton_check: FAILED: server call to {args.url} failed: {exc}", file=sys.stderr)
        return 1
    except (CheckFailed, OSError, ValueError) as exc:
        print(f"triton_check: FAILED: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(report, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
