"""Several routers over one expert pool (data-parallel attention), as `moe-serve deploy` runs
them: every router runs the dense side of the model and serves the same gRPC and HTTP ports
(SO_REUSEPORT), the placement hub publishes to all of them, and the router count follows the
dense side's load (requests waiting for room in the KV caches) or a hand on `scale --routers`,
with no request lost while routers come and go."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import openai
import pytest
import ray
import torch

from cluster.app.service import create_controller, router_name
from tests.integration.support import MARKS, NAMESPACE, free_port, serve_config, wait_until
from workers.tiny_models import BY_NAME

pytestmark = MARKS

PROMPT = "the cat sat on a mat and the dog ran far"


class Fleet:
    """A deployed tiny Mixtral with a tokenizer, 2 routers to start with (1..3)."""

    def __init__(self, path, name: str = "it-routers"):
        self.model = BY_NAME["mixtral"].save(path)
        self.name = name
        self.http_port = free_port()
        config = serve_config(name, checkpoint=str(path), workers=2,
                              router={"port": free_port(), "http_port": self.http_port, "num_cpus": 0.25, "count": 2,
                                      "min_count": 1, "max_count": 3, "grace_s": 5.0})
        self.config = config.with_overrides(**{
            "rebalance.enabled": False, "autoscaling.enabled": True, "autoscaling.check_interval_s": 0.25,
            "autoscaling.upscale_delay_s": 0.5, "autoscaling.downscale_delay_s": 1.0,
            "autoscaling.router_max_waiting": 0, "generation.max_num_seqs": 2, "generation.kv_cache_mb": 4.0})
        self.controller = create_controller(self.config)
        self.address = ray.get(self.controller.start.remote(), timeout=180)
        ray.get(self.controller.scale.remote(None, 2), timeout=60)  # hold 2 routers until a test hands over

    def status(self) -> dict:
        return ray.get(self.controller.status.remote(), timeout=60)

    def router_stats(self) -> list[dict]:
        names = [r["name"] for r in self.status()["router_fleet"]]
        return [ray.get(ray.get_actor(n, namespace=NAMESPACE).stats.remote(), timeout=30) for n in names]

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.http_port}/v1", api_key="unused", max_retries=0,
                             timeout=60)

    def complete(self, tokens: int = 16) -> list[int]:
        with self.client() as client:  # a connection of its own: the kernel picks a router for it
            out = client.completions.create(model=self.name, prompt=PROMPT, max_tokens=tokens, temperature=0,
                                            extra_body={"ignore_eos": True}, logprobs=0)
        return out.choices[0].logprobs.tokens, out.choices[0].text

    def expected_text(self, tokens: int = 16) -> str:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.config.model.checkpoint)
        ids = tokenizer(PROMPT).input_ids
        with torch.no_grad():
            out = self.model.generate(torch.tensor([ids]), max_new_tokens=tokens, do_sample=False, eos_token_id=None,
                                      pad_token_id=0)
        return tokenizer.decode(out[0].tolist(), skip_special_tokens=True)[len(tokenizer.decode(ids, skip_special_tokens=True)):]


@pytest.fixture(scope="module")
def fleet(ray_cluster, tmp_path_factory) -> Iterator[Fleet]:
    fleet = Fleet(tmp_path_factory.mktemp("routers") / "mixtral")
    yield fleet
    ray.get(fleet.controller.shutdown.remote(1.0), timeout=120)
    ray.kill(fleet.controller)


def _many(fleet: Fleet, count: int, tokens: int = 16) -> list[str | BaseException]:
    results: list[str | BaseException] = [None] * count

    def one(i: int) -> None:
        try:
            results[i] = fleet.complete(tokens)[1]
        except BaseException as err:  # counted, never hidden
            results[i] = err

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


def test_two_routers_share_the_ports_and_both_serve_the_same_tokens(fleet):
    status = fleet.status()
    routers = status["router_fleet"]
    assert [r["name"] for r in routers] == [router_name(fleet.name, 0), router_name(fleet.name, 1)]
    assert len({r["address"] for r in routers}) == 1 and len({r["http_address"] for r in routers}) == 1
    assert sorted(status["routers"]) == sorted(r["name"] for r in routers), "both attached to the placement hub"
    want = fleet.expected_text()

    results = _many(fleet, 24)

    assert results == [want] * 24
    served = [s["generation"]["steps"] for s in fleet.router_stats()]
    assert all(steps > 0 for steps in served), f"the kernel spread the connections over both routers: {served}"


def test_routers_come_and_go_by_hand_without_losing_a_request(fleet):
    want = fleet.expected_text(24)
    results: list = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            results.extend(_many(fleet, 3, 24))

    driver = threading.Thread(target=load)
    driver.start()
    try:
        out = ray.get(fleet.controller.scale.remote(None, 3), timeout=120)
        assert out["routers"] == 3, out
        wait_until(lambda: len(results) >= 9, 60, "requests on 3 routers")
        back = ray.get(fleet.controller.scale.remote(None, 1), timeout=120)
        assert back["routers"] == 1, back
        seen = len(results)
        wait_until(lambda: len(results) >= seen + 6, 60, "requests on 1 router")
    finally:
        stop.set()
        driver.join(120)

    assert results and all(r == want for r in results), [r for r in results if r != want][:3]
    status = fleet.status()
    assert [r["name"] for r in status["router_fleet"]] == [router_name(fleet.name)]
    assert status["routers"] == [router_name(fleet.name)], "removed routers are detached from the hub"
    assert [e["action"] for e in status["router_scaling"]["events"]][-3:] == ["out", "in", "in"]
    with pytest.raises(ValueError):
        ray.get_actor(router_name(fleet.name, 2), namespace=NAMESPACE)


def test_the_autoscaler_adds_a_router_when_requests_wait_and_removes_it_when_idle(fleet):
    ray.get(fleet.controller.scale.remote(None, 1), timeout=120)
    ray.get(fleet.controller.scale.remote(None), timeout=30)  # back to the autoscaler (1..3 routers)
    done = threading.Event()
    results: list = []

    def pressure() -> None:  # 16 requests at once on a router that runs 2: 14 wait
        results.extend(_many(fleet, 16, 30))
        done.set()

    threading.Thread(target=pressure, daemon=True).start()
    wait_until(lambda: len(fleet.status()["router_fleet"]) >= 2, 60, "a second router for the waiting requests",
               poll_s=0.25)
    assert done.wait(120), "the requests finished"
    assert results == [fleet.expected_text(30)] * 16
    wait_until(lambda: len(fleet.status()["router_fleet"]) == 1, 60, "back to one router once idle", poll_s=0.5)
    events = fleet.status()["router_scaling"]["events"]
    out = [e for e in events if e["action"] == "out" and e["trigger"] in ("waiting", "kv")]
    assert out and "the dense side is the bottleneck" in out[-1]["reason"]
    assert fleet.status()["router_scaling"]["mode"] == "auto"
