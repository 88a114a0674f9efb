"""Generate text from a running moe-serve server over Triton's streaming gRPC API (decoupled
mode), with the stock Triton client, unchanged.

Run with the python of the separate client venv (see ``tests/triton_env.py``), never with the
project's own environment (the stock client needs protobuf < 7)::

    .venv-triton/bin/python tests/triton_stream_check.py --url 127.0.0.1:PORT --model NAME \\
        --prompt "the cat" --max-tokens 8 --temperature 0 --ignore-eos

It opens a stream (``start_stream(callback)``), sends one request with a BYTES input
``text_input`` of shape [1] and the sampling parameters as request parameters
(``async_stream_infer``), collects the ``text_output`` pieces until the response that carries
``triton_final_response: true``, and prints one JSON line: the pieces, their text, and the last
response's parameters. A failed request (an error on the stream), a stream that ends early or a
timeout prints a message that starts with ``triton_stream_check: FAILED`` to stderr and exits 1;
bad arguments exit 2.
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
from typing import Any

import numpy as np

try:
    import tritonclient.grpc as triton_grpc
    from tritonclient.utils import InferenceServerException
except ImportError as exc:  # wrong interpreter: say which one to use
    sys.exit(
        f"triton_stream_check: FAILED: cannot import tritonclient ({exc}); run this script with the "
        "python that tests/triton_env.py:ensure_triton_venv returns (.venv-triton/bin/python)"
    )

INPUT_NAME = "text_input"
OUTPUT_NAME = "text_output"
FINAL = "triton_final_response"
REQUEST_ID = "stream-check-1"


class CheckFailed(Exception):
    """The server answered, but not as a Triton-style text generation server should."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Stream text from a moe-serve server with the stock tritonclient.")
    parser.add_argument("--url", required=True, help="host:port of the gRPC server, e.g. 127.0.0.1:8001")
    parser.add_argument("--model", required=True, help="model name to query")
    parser.add_argument("--prompt", required=True, help="the prompt, sent as text_input")
    parser.add_argument("--max-tokens", type=int, default=None, help="request parameter max_tokens")
    parser.add_argument("--temperature", type=float, default=None, help="request parameter temperature (0: greedy)")
    parser.add_argument("--seed", type=int, default=None, help="request parameter seed")
    parser.add_argument("--stop", default=None, help="request parameter stop (a string, or a JSON list of strings)")
    parser.add_argument("--ignore-eos", action="store_true", help="send request parameter ignore_eos: true")
    parser.add_argument("--param", action="append", default=[], metavar="NAME=JSON",
                        help="another request parameter, its value as JSON (e.g. max_tokens='\"many\"'); repeatable")
    parser.add_argument("--timeout-s", type=float, default=60.0, help="how long to wait for the final response")
    args = parser.parse_args(argv)
    for item in args.param:
        if "=" not in item:
            parser.error(f"--param must be NAME=JSON, got {item!r}")
    return args


def request_parameters(args: argparse.Namespace) -> dict[str, Any]:
    """The request parameters, as tritonclient sends them (str, bool, int, float kinds)."""
    params: dict[str, Any] = {}
    for name in ("max_tokens", "temperature", "seed", "stop"):
        value = getattr(args, name)
        if value is not None:
            params[name] = value
    if args.ignore_eos:
        params["ignore_eos"] = True
    for item in args.param:
        name, _, value = item.partition("=")
        params[name] = json.loads(value)
    return params


def _parameters(response: Any) -> dict[str, Any]:
    out = {}
    for name, param in response.parameters.items():
        kind = param.WhichOneof("parameter_choice")
        out[name] = getattr(param, kind) if kind else None
    return out


def stream_text(client: Any, model: str, prompt: str, params: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """One request on a stream; returns the pieces (str), their ids and the last parameters."""
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    text_input = triton_grpc.InferInput(INPUT_NAME, [1], "BYTES")
    text_input.set_data_from_numpy(np.array([prompt.encode("utf-8")], dtype=np.object_))
    client.async_stream_infer(model, inputs=[text_input], request_id=REQUEST_ID, parameters=params,
                              outputs=[triton_grpc.InferRequestedOutput(OUTPUT_NAME)])
    pieces: list[str] = []
    ids: list[str] = []
    last: dict[str, Any] = {}
    while not last.get(FINAL):
        try:
            result, error = results.get(timeout=timeout_s)
        except queue.Empty:
            raise CheckFailed(f"no {FINAL} response within {timeout_s:g}s; got {len(pieces)} pieces") from None
        if error is not None:
            raise error
        response = result.get_response()
        text = result.as_numpy(OUTPUT_NAME)
        if text is None or text.shape != (1,):
            raise CheckFailed(f"a response lacks a [1] {OUTPUT_NAME}: {response}")
        pieces.append(text[0].decode("utf-8"))
        ids.append(response.id)
        last = _parameters(response)
    client.stop_stream()
    return {"pieces": pieces, "text": "".join(pieces), "ids": ids, "last_parameters": last}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    client = triton_grpc.InferenceServerClient(url=args.url)
    try:
        report = stream_text(client, args.model, args.prompt, request_parameters(args), args.timeout_s)
    except InferenceServerException as exc:
        print(f"triton_stream_check: FAILED: the stream to {args.url} answered an error: {exc}", file=sys.stderr)
        return 1
    except (CheckFailed, OSError, ValueError) as exc:
        print(f"triton_stream_check: FAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()
    print(json.dumps(report, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
