"""`transformers` in this process, the baselines of `bench.bench_generate`.

- The two models, built with `transformers`' own classes from a seed (random weights, float32)
  and saved with `save_pretrained`, a tokenizer from `workers.tiny_models.build_tokenizer` beside.
- `generate`: one sequence, or one static batch (left padding, attention mask). A
  `LogitsProcessor` stamps every step, so a request's first token and its later ones are timed
  inside the same call.
- A Poisson stream served by static batches: the requests that have arrived (FIFO, at most
  `max_batch`) form one `generate` batch with `max_new_tokens` = the batch's largest; each
  request counts only its own tokens; the next batch starts when this one ends.
- The same stream through `transformers`' own continuous batching (`init_continuous_batching`),
  fed at the arrival times from a thread.

Every output has exactly the asked number of tokens (the models have no end-of-sequence token).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from pathlib import Path

import torch

from bench.generate_load import Request, Timing
from workers.tiny_models import build_tokenizer

MODELS = {
    "S": ("MixtralConfig", dict(hidden_size=1024, num_hidden_layers=8, num_local_experts=8, num_experts_per_tok=2,
                                intermediate_size=1408, num_attention_heads=16, num_key_value_heads=4,
                                vocab_size=4096, max_position_embeddings=2048)),
    "Q": ("Qwen3MoeConfig", dict(hidden_size=1024, num_hidden_layers=8, num_experts=32, num_experts_per_tok=4,
                                 moe_intermediate_size=512, num_attention_heads=16, num_key_value_heads=4,
                                 head_dim=64, vocab_size=4096, max_position_embeddings=2048, mlp_only_layers=[],
                                 decoder_sparse_step=1, norm_topk_prob=True)),
}
QUICK_SHAPES = {  # --quick: the same families, tiny
    "S": dict(hidden_size=128, num_hidden_layers=2, num_local_experts=4, intermediate_size=256,
              num_attention_heads=4, num_key_value_heads=2, vocab_size=512, max_position_embeddings=512),
    "Q": dict(hidden_size=128, num_hidden_layers=2, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64,
              num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=512, max_position_embeddings=512),
}
PAD_ID = 0
CB_PAGE_TOKENS = 64  # transformers' continuous batching: tokens per KV page (its default, 256, suits GPUs)


def build_model(name: str, quick: bool, seed: int, path: Path) -> torch.nn.Module:
    """Model `name` of MODELS (tiny with `quick`), random weights from `seed`, saved to `path`
    with a tokenizer of its vocabulary; returned in eval mode, with no end-of-sequence token."""
    import transformers

    config_cls, shape = MODELS[name]
    shape = {**shape, **(QUICK_SHAPES[name] if quick else {})}
    config = getattr(transformers, config_cls)(**shape, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(path)
    build_tokenizer(config.vocab_size, seed=seed).save_pretrained(path)
    model.generation_config.eos_token_id = None  # every output runs to max_new_tokens
    return model


def kv_bytes_per_token(config) -> int:
    """Float32 K and V of one token over every layer."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim * 4


class StepClock:
    """A logits processor that stamps each step of `generate`: `stamps[k]` is when the scores of
    output token k are ready (it is picked right after)."""

    def __init__(self):
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.stamps.append(time.perf_counter())
        return scores


def generate(model: torch.nn.Module, prompts: list[list[int]], new_tokens: int) -> list[float]:
    """Greedy `generate` of `new_tokens` for `prompts` as one left-padded batch; its step stamps."""
    from transformers import LogitsProcessorList

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    clock = StepClock()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=PAD_ID, logits_processor=LogitsProcessorList([clock]))
    if out.shape[1] - width != new_tokens or len(clock.stamps) != new_tokens:
        raise RuntimeError(f"generate made {out.shape[1] - width} tokens ({len(clock.stamps)} steps), "
                           f"asked for {new_tokens}")
    return clock.stamps


def warm_up(model: torch.nn.Module, prompt: list[int]) -> None:
    generate(model, [prompt[:16], prompt[:8]], 4)


def single(model: torch.nn.Module, request: Request, repeats: int) -> list[Timing]:
    """One sequence, `repeats` times one after another."""
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        timings.append(Timing.from_stamps(start, 0.0, generate(model, [request.prompt], request.new_tokens)))
    return timings


def static_batch(model: torch.nn.Module, requests: list[Request]) -> list[Timing]:
    """Requests arriving together, as one batch (the same new_tokens each)."""
    start = time.perf_counter()
    stamps = generate(model, [r.prompt for r in requests], requests[0].new_tokens)
    return [Timing.from_stamps(start, 0.0, stamps) for _ in requests]


def static_stream(model: torch.nn.Module, requests: list[Request], max_batch: int) -> list[Timing]:
    """The stream (arrival order) through static batches of what has arrived, FIFO, at most `max_batch`."""
    pending = deque(sorted(range(len(requests)), key=lambda i: requests[i].at_s))
    timings: dict[int, Timing] = {}
    start = time.perf_counter()
    while pending:
        wait_s = requests[pending[0]].at_s - (time.perf_counter() - start)
        if wait_s > 0:
            time.sleep(wait_s)
        now_s = time.perf_counter() - start
        batch = []
        while pending and len(batch) < max_batch and requests[pending[0]].at_s <= now_s:
            batch.append(pending.popleft())
        stamps = generate(model, [requests[i].prompt for i in batch], max(requests[i].new_tokens for i in batch))
        for i in batch:
            timings[i] = Timing.from_stamps(start, requests[i].at_s, stamps[:requests[i].new_tokens])
    return [timings[i] for i in range(len(requests))]


def continuous_stream(model: torch.nn.Module, requests: list[Request], kv_cache_mb: float, max_batch_tokens: int,
                      max_seqs: int, timeout_s: float = 3600.0) -> list[Timing]:
    """The stream through `transformers`' continuous batching, sized like the served engine: a
    KV cache of `kv_cache_mb`, at most `max_batch_tokens` per step and `max_seqs` sequences."""
    from transformers import ContinuousBatchingConfig, GenerationConfig

    logging.getLogger("ContinuousBatchingLogger").setLevel(logging.CRITICAL)  # psutil notes on CPU
    kv_tokens = int(kv_cache_mb * 2**20) // kv_bytes_per_token(model.config)
    cb_config = ContinuousBatchingConfig(page_size=CB_PAGE_TOKENS, num_blocks=math.ceil(kv_tokens / CB_PAGE_TOKENS),
                                         max_batch_tokens=max_batch_tokens, max_requests_per_batch=max_seqs)
    gen_config = GenerationConfig(do_sample=False, max_new_tokens=max(r.new_tokens for r in requests),
                                  eos_token_id=-1, pad_token_id=PAD_ID)
    manager = model.init_continuous_batching(generation_config=gen_config, continuous_batching_config=cb_config)
    manager.start()
    try:
        warm = manager.add_request(requests[0].prompt[:16], request_id="warm-up", max_new_tokens=4)
        _collect(manager, {warm: 4}, time.perf_counter() + 120)
        start = time.perf_counter()
        errors: list[BaseException] = []
        feeder = threading.Thread(target=_feed, args=(manager, requests, start, errors), daemon=True)
        feeder.start()
        wanted = {f"r{i}": r.new_tokens for i, r in enumerate(requests)}
        results = _collect(manager, wanted, start + timeout_s, errors)
        feeder.join(10)
    finally:
        manager.stop(block=True, timeout=30)
    return [Timing.from_stamps(start, r.at_s, results[f"r{i}"].timestamps) for i, r in enumerate(requests)]


def _feed(manager, requests: list[Request], start: float, errors: list[BaseException]) -> None:
    try:
        for i, request in enumerate(requests):
            time.sleep(max(0.0, start + request.at_s - time.perf_counter()))
            if manager.add_request(request.prompt, request_id=f"r{i}", max_new_tokens=request.new_tokens,
                                   record_timestamps=True) is None:
                raise RuntimeError(f"continuous batching refused request r{i}")
    except BaseException as err:  # handed to the collecting thread
        errors.append(err)


def _collect(manager, wanted: dict[str, int], deadline_s: float, errors: list[BaseException] | None = None) -> dict:
    """Results of the requests `wanted` (id -> new tokens), each checked to have exactly its tokens."""
    results = {}
    while len(results) < len(wanted):
        if errors:
            raise errors[0]
        if time.perf_counter() > deadline_s:
            raise TimeoutError(f"continuous batching finished {len(results)} of {len(wanted)} requests in time")
        result = manager.get_result(timeout=0.5)
        if result is None:
            if not manager.is_running():
                raise RuntimeError("transformers' continuous batching loop stopped before every request finished")
            continue
        if not result.is_finished() or result.request_id not in wanted:
            continue
        if result.error is not None:
            raise RuntimeError(f"request {result.request_id} failed in continuous batching: {result.error}")
        if len(result.generated_tokens) != wanted[result.request_id]:
            raise RuntimeError(f"request {result.request_id} got {len(result.generated_tokens)} tokens, "
                               f"asked for {wanted[result.request_id]}")
        results[result.request_id] = result
    return results
