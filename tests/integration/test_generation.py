"""Whole models generate through the real stack: the router's dense side (the family's own
`transformers` modules over the paged KV cache) and the expert pool on Ray for every MoE layer.
Greedy tokens equal `transformers`' own `generate` on the same checkpoint, for every family,
alone and with 16 sequences in flight, through KV-cache preemption, a lost worker, and a
cancelled request; the MoE calls count as routed load."""

from __future__ import annotations

import asyncio
import time

import pytest
import ray
import torch
import transformers

from cluster.control.metrics import GENERATION_METRICS, exported_name
from router_service.generation.params import SamplingParams
from tests.integration.support import MARKS, Served, run_on, scrape, serve_config, total, wait_until
from workers.tiny_models import BY_NAME, FAMILIES, TinyFamily

pytestmark = MARKS

PROMPTS = ["the cat sat on", "a big red sun", "dog ran far to the sea and", "moon rose over quiet hills",
           "the old stone river", "birds sing of rain", "light and dark", "a new wind",
           "fire under the hill", "the mat", "snow", "where the sea is quiet and the sun",
           "red and old", "over hills and far", "quiet", "the big dog sat"]
NEW_TOKENS = 12
NO_HTTP = {"http_port": None}  # the engine is tested here; the HTTP face has its own tests


def _reference(model: torch.nn.Module, prompt_ids: list[int], new_tokens: int = NEW_TOKENS) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt_ids):].tolist()


async def _generate(text, prompt_ids: list[int], params: SamplingParams) -> tuple[list[int], str, str]:
    tokens, pieces, reason = [], [], None
    async for out in text.generate(prompt_ids, params):
        tokens += out.token_ids
        pieces.append(out.text)
        reason = out.finish_reason
    return tokens, "".join(pieces), reason


def _all(served: Served, server_loop, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    text = served.deployment.router.text

    async def run():
        return await asyncio.gather(*(_generate(text, p, params) for p in prompts))

    return [tokens for tokens, _, _ in run_on(server_loop, run())]


GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)


def _deploy(deploy_served, tmp_path, family: TinyFamily, http: bool = False,
            **generation) -> tuple[Served, torch.nn.Module]:
    path = tmp_path / family.name
    model = family.save(path)
    router = None if http else NO_HTTP
    config = serve_config(f"it-gen-{family.name}", checkpoint=str(path), workers=2, router=router).with_overrides(
        **{"rebalance.enabled": False, **{f"generation.{k}": v for k, v in generation.items()}})
    start, _ = deploy_served
    return start(config), model


def _over_http(served: Served, prompt_ids: list[int]) -> list[str]:
    """One greedy completion through the OpenAI endpoint (token ids in), as the stock client
    reads it: the generated tokens' strings."""
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{served.deployment.server.http.port}/v1", api_key="x",
                           max_retries=0, timeout=60)
    with client:
        answer = client.completions.create(model=served.name, prompt=[prompt_ids], max_tokens=NEW_TOKENS,
                                           temperature=0, logprobs=0, extra_body={"ignore_eos": True})
    return answer.choices[0].logprobs.tokens


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_greedy_generation_equals_transformers_alone_and_batched(family, deploy_served, server_loop, tmp_path):
    """Every family: one prompt through the OpenAI endpoint, three alone through the engine, and 16
    prompts batched together give `transformers`' own greedy tokens."""
    served, model = _deploy(deploy_served, tmp_path, family, http=True)
    try:
        text = served.deployment.router.text
        assert text is not None and served.deployment.side.text_note is None
        prompts = [text.prompt_ids(p) for p in PROMPTS]
        want = [_reference(model, p) for p in prompts]

        tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / family.name)
        assert _over_http(served, prompts[0]) == [tokenizer.decode([t]) for t in want[0]]
        alone = [_all(served, server_loop, [p], GREEDY)[0] for p in prompts[:3]]
        together = _all(served, server_loop, prompts, GREEDY)

        assert alone == want[:3]
        assert together == want, "continuous batching changed the tokens"
        assert text.engine.stats()["kv_used_fraction"] == 0.0, "every block came back"
        routed = served.deployment.router.expert_tokens.sum()
        assert routed >= sum(len(p) + NEW_TOKENS - 1 for p in prompts) * served.spec.top_k
    finally:
        deploy_served[1](served)


def test_preemption_under_a_small_cache_keeps_the_tokens(deploy_served, server_loop, tmp_path):
    """A cache of a few blocks: sequences are preempted and computed again, tokens unchanged."""
    served, model = _deploy(deploy_served, tmp_path, BY_NAME["mixtral"], kv_cache_mb=0.05, block_size=4,
                            prefill_chunk_tokens=8)
    try:
        text = served.deployment.router.text
        assert text.engine.allocator.num_blocks < 40, "the test needs a cache that cannot hold every sequence"
        prompts = [text.prompt_ids(p) for p in PROMPTS[:10]]
        want = [_reference(model, p) for p in prompts]
        steps_before = text.engine.steps

        assert _all(served, server_loop, prompts, GREEDY) == want
        assert text.engine.steps > steps_before
        assert text.engine.stats()["kv_used_fraction"] == 0.0
    finally:
        deploy_served[1](served)


@pytest.fixture(scope="module")
def replicated(deploy_served, tmp_path_factory):
    """Qwen2-MoE (shared expert pieces too) on 3 workers, every expert on two of them."""
    path = tmp_path_factory.mktemp("gen") / "qwen2"
    model = BY_NAME["qwen2-shared-expert"].save(path)
    config = serve_config("it-gen-replicated", checkpoint=str(path), workers=3, router=NO_HTTP).with_overrides(
        **{"rebalance.enabled": False, "rebalance.min_replicas": 2, "workers.slots_per_worker": 16})
    start, stop = deploy_served
    served = start(config)
    yield served, model
    stop(served)


def test_a_lost_worker_fails_no_generation_where_replicas_exist(replicated, server_loop):
    served, model = replicated
    text = served.deployment.router.text
    plane = served.deployment.plane
    wait_until(lambda: not plane.hub.down, 30, "every worker up")
    prompts = [text.prompt_ids(p) for p in PROMPTS]
    want = [_reference(model, p, 30) for p in prompts]
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)

    async def run():
        tasks = [asyncio.ensure_future(_generate(text, p, params)) for p in prompts]
        while text.engine.steps < 5:
            await asyncio.sleep(0.01)
        ray.kill(plane.pool.handles[1], no_restart=False)  # mid-generation; Ray restarts it empty
        return await asyncio.gather(*tasks)

    results = run_on(server_loop, run())

    assert [tokens for tokens, _, _ in results] == want
    assert served.deployment.router._layer.retries > 0, "shares on the lost worker were sent again"


def test_a_cancelled_request_frees_its_blocks(replicated, server_loop):
    served, _ = replicated
    text = served.deployment.router.text
    prompt = text.prompt_ids(PROMPTS[0])

    async def run():
        stream = text.generate(prompt, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
        async for _ in stream:
            break  # the client goes away after its first token
        busy = text.engine.stats()["running"]
        for _ in range(200):
            if text.engine.stats()["running"] == 0:
                break
            await asyncio.sleep(0.01)
        return busy, text.engine.stats()

    busy, after = run_on(server_loop, run())

    assert busy == 1
    assert after["running"] == 0 and after["waiting"] == 0 and after["kv_used_fraction"] == 0.0


def test_generation_is_routed_load_in_the_routers_report(replicated, server_loop):
    """The MoE calls of generation and its tokens reach the control plane's load board through
    the routers' reports, whichever loop (observer, supervisor, controller) takes them."""
    served, _ = replicated
    text = served.deployment.router.text
    feed = served.deployment.plane.feed
    run_on(server_loop, feed.refresh())  # what came before is on the board now
    since = time.monotonic()
    _all(served, server_loop, [text.prompt_ids(p) for p in PROMPTS[:4]], GREEDY)
    run_on(server_loop, feed.refresh())

    assert feed.snapshot(time.monotonic()).expert_tokens.sum() > 0  # the window (5 s) holds the last steps' calls
    assert feed.board.generated_since(since) == (4 * NEW_TOKENS, 4)


def test_generation_metrics_reach_prometheus(replicated, server_loop):
    served, _ = replicated
    text = served.deployment.router.text
    _all(served, server_loop, [text.prompt_ids(p) for p in PROMPTS[:3]], GREEDY)

    def present() -> set[str]:
        names = {n for n, labels, _ in scrape() if labels.get("model") == served.name}
        return {name for name in GENERATION_METRICS if any(n.startswith(exported_name(name)) for n in names)}

    wait_until(lambda: present() == set(GENERATION_METRICS), 30, "every generation metric", poll_s=0.5)
    samples = scrape()
    assert total(samples, exported_name("generation_tokens") + "_total", model=served.name) >= 3 * NEW_TOKENS
    assert total(samples, exported_name("time_to_first_token_s") + "_count", model=served.name) >= 3
