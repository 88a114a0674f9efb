"""`moe-serve demo`, second part: a whole model generates text. A tiny Mixtral-shaped checkpoint
with a tokenizer is made offline (`transformers`' own classes, random weights; the tokenizer
trained with `tokenizers`), served, and asked for a few completions at once over the
OpenAI-compatible HTTP API, streamed. Every completion is checked against `transformers`'
own `generate` on the same checkpoint, token for token."""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import torch
from rich.console import Console
from rich.table import Table

from cluster.app.console import load_progress, summary_table
from cluster.app.launcher import deploy
from cluster.config import ServeConfig

PROMPTS = ("the cat sat on", "a big red sun over the sea", "birds sing of rain and", "the old dog ran far to")
NEW_TOKENS = 24


@dataclass(frozen=True)
class Completion:
    prompt: str
    text: str
    tokens: int
    ttft_s: float
    tpot_s: float
    finish_reason: str


async def _stream(session: aiohttp.ClientSession, url: str, model: str, prompt: str) -> Completion:
    """One streamed completion over HTTP, timed as a client sees it."""
    body = {"model": model, "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0, "stream": True,
            "ignore_eos": True}
    start, first, last, pieces, tokens, reason = time.perf_counter(), None, None, [], 0, ""
    async with session.post(url, json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {await response.text()}")
        async for line in response.content:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            for choice in chunk.get("choices", []):
                now = time.perf_counter()
                first, last = first or now, now
                pieces.append(choice.get("text", ""))
                reason = choice.get("finish_reason") or reason
            tokens = chunk.get("usage", {}).get("completion_tokens", tokens) if chunk.get("usage") else tokens
    tpot = (last - first) / max(tokens - 1, 1) if first is not None else 0.0
    return Completion(prompt, "".join(pieces), tokens, (first or start) - start, tpot, reason)


def _reference(model, tokenizer, prompt: str) -> str:
    ids = tokenizer(prompt).input_ids
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    return tokenizer.decode(out[0].tolist(), skip_special_tokens=True)[len(tokenizer.decode(ids, skip_special_tokens=True)):]


async def run_text_demo(config: ServeConfig, console: Console) -> bool:
    """Serve a tiny checkpoint and stream a few completions at once; True when every one has the
    tokens `transformers` generates."""
    from transformers import AutoTokenizer

    from workers.tiny_models import BY_NAME

    console.rule("[bold]text generation: a whole model")
    with tempfile.TemporaryDirectory(prefix="moe-serve-demo-") as root:
        path = Path(root) / "tiny-mixtral"
        model = BY_NAME["mixtral"].save(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        config = config.with_overrides(**{"model.checkpoint": str(path), "model.name": "tiny-mixtral",
                                          "router.http_port": 0})
        with load_progress(console) as progress:
            deployment = await deploy(config, progress)
        try:
            console.print(f"a tiny Mixtral-shaped checkpoint with its tokenizer, made offline: "
                          f"{deployment.describe_text()}", highlight=False)
            url = f"http://{deployment.http_address}/v1/completions"
            start = time.perf_counter()
            async with aiohttp.ClientSession() as session:
                completions = await asyncio.gather(*(_stream(session, url, "tiny-mixtral", p) for p in PROMPTS))
            wall_s = time.perf_counter() - start
            routed = int(deployment.router.expert_tokens.sum())
            stats = deployment.router.text.engine.stats()
        finally:
            await deployment.stop()
        exact = [c.text == _reference(model, tokenizer, c.prompt) for c in completions]
    console.print(_table(completions, exact))
    tokens = sum(c.tokens for c in completions)
    console.print(summary_table("what happened", {
        "completions (streamed at once over HTTP)": str(len(completions)),
        "tokens generated": f"{tokens} in {wall_s:.2f}s ({tokens / wall_s:,.0f} tokens/s, one engine step for all)",
        "same tokens as transformers' generate": f"{sum(exact)} of {len(exact)}",
        "engine steps": str(stats["steps"]),
        "expert-tokens routed to the workers": f"{routed} (every MoE layer of every step; routed load for rebalancing)",
    }))
    return all(exact)


def _table(completions: list[Completion], exact: list[bool]) -> Table:
    table = Table(title="completions (greedy; the tiny model's weights are random, so is its text)")
    for col in ("prompt", "completion", "tokens", "TTFT ms", "TPOT ms", "= transformers"):
        table.add_column(col, justify="left" if col in ("prompt", "completion") else "right")
    for c, ok in zip(completions, exact):
        table.add_row(c.prompt, repr(c.text), str(c.tokens), f"{c.ttft_s * 1000:.0f}", f"{c.tpot_s * 1000:.1f}",
                      "[green]yes[/]" if ok else "[red]no[/]")
    return table
