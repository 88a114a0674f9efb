"""The OpenAI-compatible HTTP API of a real deployment (Ray workers serving the MoE layers, the
router generating), through the stock `openai` client: the model list, completions and chat
completions, streaming or not, give `transformers`' own greedy tokens for Mixtral and DeepSeek-V3;
16 concurrent requests (batched together by the engine) give the same tokens as each alone; a
bad request is the client's `BadRequestError` naming the field."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import product

import pytest
import torch

from cluster.config import GenerationConfig
from tests.integration.support import MARKS, Served, serve_config
from workers.tiny_models import BY_NAME, WORDS

pytestmark = MARKS
openai = pytest.importorskip("openai")
transformers = pytest.importorskip("transformers")

PROMPTS = ["the cat sat on", "a big red sun", "where birds sing of rain"]
NEW_TOKENS = 8
EOS = 2  # the tiny models' end-of-sequence id


@dataclass
class Api:
    served: Served
    client: openai.OpenAI
    hf: torch.nn.Module
    tokenizer: object

    @property
    def model(self) -> str:
        return self.served.name

    def ids(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt).input_ids)

    def greedy(self, prompt_ids: list[int], new_tokens: int = NEW_TOKENS, ignore_eos: bool = False) -> list[int]:
        """transformers' own greedy continuation, alone in its batch."""
        with torch.no_grad():
            out = self.hf.generate(torch.tensor([prompt_ids]), max_new_tokens=new_tokens, do_sample=False,
                                   pad_token_id=0, **({"eos_token_id": None} if ignore_eos else {}))
        return out[0, len(prompt_ids):].tolist()

    def strings(self, ids: list[int]) -> list[str]:
        return [self.tokenizer.decode([t]) for t in ids]


@pytest.fixture(scope="module", params=["mixtral", "deepseek-v3"])
def api(request, deploy_served, tmp_path_factory) -> Iterator[Api]:
    path = tmp_path_factory.mktemp(f"openai-{request.param}")
    BY_NAME[request.param].save(path)
    config = serve_config(f"it-openai-{request.param}", checkpoint=str(path), workers=2)
    config = config.model_copy(update={"generation": GenerationConfig(kv_cache_mb=8, device="cpu")})
    start, stop = deploy_served
    served = start(config)
    port = served.deployment.server.http.port
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=60)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    yield Api(served, client, hf, transformers.AutoTokenizer.from_pretrained(path))
    client.close()
    stop(served)


def test_the_model_list_names_the_model(api: Api) -> None:
    models = api.client.models.list().data
    assert [m.id for m in models] == [api.model]
    assert models[0].owned_by == "moe-serve" and models[0].model_extra["max_model_len"] == 64


@pytest.mark.parametrize("ignore_eos", [False, True], ids=["until-eos", "ignore-eos"])
def test_completions_are_transformers_greedy_tokens(api: Api, ignore_eos: bool) -> None:
    answer = api.client.completions.create(model=api.model, prompt=PROMPTS, max_tokens=NEW_TOKENS, temperature=0,
                                           logprobs=0, extra_body={"ignore_eos": ignore_eos})
    assert [c.index for c in answer.choices] == [0, 1, 2]
    for prompt, choice in zip(PROMPTS, answer.choices):
        want = api.greedy(api.ids(prompt), ignore_eos=ignore_eos)
        assert choice.logprobs.tokens == api.strings(want), prompt
        assert choice.finish_reason == ("stop" if want[-1] == EOS and not ignore_eos else "length")
    prompt_tokens = sum(len(api.ids(p)) for p in PROMPTS)
    completion_tokens = sum(len(c.logprobs.tokens) for c in answer.choices)
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (prompt_tokens, completion_tokens)

    chunks = list(api.client.completions.create(model=api.model, prompt=PROMPTS, max_tokens=NEW_TOKENS,
                                                temperature=0, stream=True, stream_options={"include_usage": True},
                                                extra_body={"ignore_eos": ignore_eos}))
    for choice in answer.choices:
        streamed = "".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == choice.index)
        assert streamed == choice.text
    assert chunks[-1].choices == [] and chunks[-1].usage == answer.usage


def test_chat_completions_are_transformers_greedy_tokens(api: Api) -> None:
    messages = [{"role": "user", "content": "the dog ran far"}]
    prompt_ids = api.ids(api.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    want = api.greedy(prompt_ids, ignore_eos=True)
    answer = api.client.chat.completions.create(model=api.model, messages=messages, max_completion_tokens=NEW_TOKENS,
                                                temperature=0, logprobs=True, top_logprobs=2,
                                                extra_body={"ignore_eos": True})
    choice = answer.choices[0]
    assert [t.token for t in choice.logprobs.content] == api.strings(want)
    assert all(len(t.top_logprobs) == 2 for t in choice.logprobs.content)
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (len(prompt_ids), NEW_TOKENS)

    chunks = list(api.client.chat.completions.create(model=api.model, messages=messages, stream=True,
                                                     max_completion_tokens=NEW_TOKENS, temperature=0,
                                                     extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage.total_tokens == answer.usage.total_tokens


def test_concurrent_requests_get_the_tokens_each_gets_alone(api: Api) -> None:
    prompts = [" ".join(pair) for pair in list(product(WORDS[:4], WORDS[4:8]))[:16]]
    engine = api.served.deployment.router.text.engine
    steps = engine.steps

    def ask(prompt: str) -> list[str]:
        answer = api.client.completions.create(model=api.model, prompt=prompt, max_tokens=NEW_TOKENS, temperature=0,
                                               logprobs=0, extra_body={"ignore_eos": True})
        return answer.choices[0].logprobs.tokens

    with ThreadPoolExecutor(len(prompts)) as pool:
        got = list(pool.map(ask, prompts))
    assert engine.steps - steps < len(prompts) * NEW_TOKENS, "the requests never shared a step"
    for prompt, tokens in zip(prompts, got):
        assert tokens == api.strings(api.greedy(api.ids(prompt), ignore_eos=True)), prompt


def test_a_bad_request_is_the_clients_bad_request_error(api: Api) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        api.client.completions.create(model=api.model, prompt="a", max_tokens=0)
    assert "max_tokens" in caught.value.message
    with pytest.raises(openai.NotFoundError) as missing:
        api.client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "a"}])
    assert api.model in missing.value.message
