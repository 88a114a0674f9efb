"""A layer request through system shared memory with the stock Triton client, unchanged:
``tritonclient.utils.shared_memory`` makes the regions, ``InferenceServerClient`` registers them.

Run with the python of the separate client venv (see ``tests/triton_env.py``)::

    .venv-triton/bin/python tests/triton_shm_check.py --url 127.0.0.1:PORT --model NAME \\
        --hidden H --top-k K --layer L --input in.npy --output out.npy

It checks that the server lists the ``system_shared_memory`` extension, creates an input region
(the hidden states written into it) and one output region, registers both, sends ModelInfer with
the input in shared memory, output ``hidden_states`` into the output region at offset 0,
``topk_weights`` into it after that, and ``topk_ids`` in the response (so the raw entries must
stay one per output); it reads the outputs from the region, unregisters both regions, checks
the status no longer lists them and that a request naming the unregistered input region is
refused, then destroys the regions. It writes the hidden states read from the region to
``--output`` and prints one JSON line. A failure prints ``triton_shm_check: FAILED ...`` to
stderr and exits 1; bad arguments exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

try:
    import tritonclient.grpc as triton_grpc
    import tritonclient.utils.shared_memory as shm
    from tritonclient.utils import InferenceServerException
except ImportError as exc:  # wrong interpreter: say which one to use
    sys.exit(
        f"triton_shm_check: FAILED: cannot import tritonclient ({exc}); run this script with the "
        "python that tests/triton_env.py:ensure_triton_venv returns (.venv-triton/bin/python)"
    )


class CheckFailed(Exception):
    """The server answered, but not as a server with the system shared memory extension should."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="A layer request through system shared memory, stock tritonclient.")
    parser.add_argument("--url", required=True, help="host:port of the gRPC server, e.g. 127.0.0.1:8001")
    parser.add_argument("--model", required=True, help="model name to query")
    parser.add_argument("--hidden", type=int, required=True, help="hidden size H; input must be [tokens, H]")
    parser.add_argument("--top-k", type=int, required=True, help="experts per token k (topk outputs are [tokens, k])")
    parser.add_argument("--layer", type=int, required=True, help="MoE layer index, sent as request parameter")
    parser.add_argument("--input", type=Path, required=True, help=".npy file with FP32 hidden states [tokens, H]")
    parser.add_argument("--output", type=Path, required=True, help=".npy file to write output hidden states to")
    parser.add_argument("--timeout-s", type=float, default=60.0, help="per-call client deadline in seconds")
    args = parser.parse_args(argv)
    if args.hidden <= 0 or args.top_k <= 0:
        parser.error(f"--hidden and --top-k must be positive, got {args.hidden} and {args.top_k}")
    return args


def _load(path: Path, hidden: int) -> np.ndarray:
    array = np.load(path, allow_pickle=False)
    if array.dtype != np.float32 or array.ndim != 2 or array.shape[1] != hidden:
        raise CheckFailed(f"{path} holds {array.dtype} {list(array.shape)}, expected float32 [tokens, {hidden}]")
    return np.ascontiguousarray(array)


def _infer(client: Any, args: argparse.Namespace, x: np.ndarray, names: tuple[str, str],
           sizes: tuple[int, int, int]) -> Any:
    """ModelInfer: input from region names[0]; hidden_states and topk_weights into names[1]."""
    in_bytes, hs_bytes, tw_bytes = sizes
    infer_input = triton_grpc.InferInput("hidden_states", list(x.shape), "FP32")
    infer_input.set_shared_memory(names[0], in_bytes)
    hidden = triton_grpc.InferRequestedOutput("hidden_states")
    hidden.set_shared_memory(names[1], hs_bytes)
    weights = triton_grpc.InferRequestedOutput("topk_weights")
    weights.set_shared_memory(names[1], tw_bytes, offset=hs_bytes)
    ids = triton_grpc.InferRequestedOutput("topk_ids")  # in the response, after a shared memory output
    return client.infer(args.model, [infer_input], outputs=[hidden, ids, weights],
                        parameters={"layer": args.layer}, client_timeout=args.timeout_s)


def _registered(client: Any, timeout_s: float) -> list[str]:
    status = client.get_system_shared_memory_status(client_timeout=timeout_s)
    return sorted(status.regions)


def run_check(args: argparse.Namespace) -> dict[str, Any]:
    x = _load(args.input, args.hidden)
    tokens, k = x.shape[0], args.top_k
    sizes = (x.nbytes, tokens * args.hidden * 4, tokens * k * 4)
    tag = f"moe-serve-check-{os.getpid()}"
    names, keys = (f"{tag}-in", f"{tag}-out"), (f"/{tag}-in", f"/{tag}-out")
    client = triton_grpc.InferenceServerClient(url=args.url)
    regions = [shm.create_shared_memory_region(names[0], keys[0], sizes[0]),
               shm.create_shared_memory_region(names[1], keys[1], sizes[1] + sizes[2])]
    report: dict[str, Any] = {}
    try:
        report["server_extensions"] = list(client.get_server_metadata(client_timeout=args.timeout_s).extensions)
        if "system_shared_memory" not in report["server_extensions"]:
            raise CheckFailed(f"ServerMetadata lists no system_shared_memory: {report['server_extensions']}")
        shm.set_shared_memory_region(regions[0], [x])
        client.register_system_shared_memory(names[0], keys[0], sizes[0], client_timeout=args.timeout_s)
        client.register_system_shared_memory(names[1], keys[1], sizes[1] + sizes[2], client_timeout=args.timeout_s)
        report["registered"] = [n for n in _registered(client, args.timeout_s) if n.startswith(tag)]

        result = _infer(client, args, x, names, sizes)
        response = result.get_response()
        report["outputs"] = [{"name": o.name, "datatype": o.datatype, "shape": [int(d) for d in o.shape]}
                             for o in response.outputs]
        report["raw_output_bytes"] = [len(raw) for raw in response.raw_output_contents]
        out = np.array(shm.get_contents_as_numpy(regions[1], np.float32, [tokens, args.hidden]))
        weights = np.array(shm.get_contents_as_numpy(regions[1], np.float32, [tokens, k], offset=sizes[1]))
        topk_ids = result.as_numpy("topk_ids")
        if topk_ids is None or topk_ids.shape != (tokens, k):
            raise CheckFailed(f"topk_ids from the response is {None if topk_ids is None else topk_ids.shape}")
        report["topk_weights_row_sums"] = [round(float(s), 6) for s in weights.sum(axis=1)[:4]]
        report["topk_ids_in_range"] = bool(((topk_ids >= 0) & (topk_ids < 1 << 20)).all())

        for name in names:
            client.unregister_system_shared_memory(name, client_timeout=args.timeout_s)
        report["registered_after_unregister"] = [n for n in _registered(client, args.timeout_s) if n.startswith(tag)]
        try:
            _infer(client, args, x, names, sizes)
            report["after_unregister"] = "served"
        except InferenceServerException as exc:
            report["after_unregister"] = f"{exc.status()}: {exc.message()}"
    finally:
        client.close()
        for region in regions:
            shm.destroy_shared_memory_region(region)
    np.save(args.output, out)
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = run_check(args)
    except InferenceServerException as exc:
        print(f"triton_shm_check: FAILED: server call to {args.url} failed: {exc}", file=sys.stderr)
        return 1
    except (CheckFailed, OSError, ValueError) as exc:
        print(f"triton_shm_check: FAILED: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(report, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
