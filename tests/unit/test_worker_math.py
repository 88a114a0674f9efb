"""Expert math (fused SwiGLU, per-expert runs) against the unfused Mixtral formula, and the expert
shard worker used as a plain object: load, forward, unload, export/load_from, stats."""

from __future__ import annotations

import os

import numpy as np
import pytest
import ray
import torch
import torch.nn.functional as F

from cluster.model_spec import ModelSpec
from cluster.placement import ExpertShare
from workers.expert_math import fuse_w13, run_experts, swiglu
from workers.random_model import RandomModel
from workers.weights import ExpertWeights
from workers.worker import ExpertWorker

SPEC = ModelSpec(
    hidden_size=8, intermediate_size=12, num_experts=4, top_k=2, moe_layers=(0, 1), num_hidden_layers=2
)


def unfused(x: torch.Tensor, w: ExpertWeights) -> torch.Tensor:
    """Mixtral's expert, written out in float64: w2(silu(w1 x) * w3 x)."""
    x, w1, w2, w3 = x.double(), w.w1.double(), w.w2.double(), w.w3.double()
    return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)


def random_expert(seed: int, hidden: int = 8, inter: int = 12) -> ExpertWeights:
    gen = torch.Generator().manual_seed(seed)
    return ExpertWeights(
        w1=torch.randn(inter, hidden, generator=gen) / hidden**0.5,
        w2=torch.randn(hidden, inter, generator=gen) / inter**0.5,
        w3=torch.randn(inter, hidden, generator=gen) / hidden**0.5,
    )


@pytest.fixture
def restore_torch_threads():
    """ExpertWorker sets torch's thread count for the process; put it back afterwards."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def worker(restore_torch_threads) -> ExpertWorker:
    return ExpertWorker(3, RandomModel(SPEC, seed=11), torch_threads=1, device="cpu")


# ---------------------------------------------------------------------------------------------
# expert_math
# ---------------------------------------------------------------------------------------------


def test_fuse_w13_stacks_gate_then_up_rows() -> None:
    w = random_expert(0)

    w13 = fuse_w13(w.w1, w.w3)

    assert w13.shape == (24, 8)
    assert w13.is_contiguous()
    assert torch.equal(w13[:12], w.w1) and torch.equal(w13[12:], w.w3)


@pytest.mark.parametrize("tokens", [1, 5, 64])
def test_swiglu_equals_unfused_formula(tokens: int) -> None:
    w = random_expert(tokens)
    x = torch.randn(tokens, 8, generator=torch.Generator().manual_seed(1))

    y = swiglu(x, fuse_w13(w.w1, w.w3), w.w2)

    assert y.shape == (tokens, 8) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), unfused(x, w), rtol=1e-5, atol=1e-6)


def test_swiglu_writes_into_out() -> None:
    w = random_expert(2)
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(2))
    out = torch.full((3, 8), float("nan"))

    returned = swiglu(x, fuse_w13(w.w1, w.w3), w.w2, out=out)

    assert returned.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out.double(), unfused(x, w), rtol=1e-5, atol=1e-6)


def test_run_experts_equals_per_segment_computation() -> None:
    experts = [random_expert(s) for s in range(3)]
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(5))
    # segment 0: tokens 0, 2, 5; segment 1: empty; segment 2: tokens 2, 3 (token 2 twice overall)
    offsets = torch.tensor([0, 3, 3, 5])
    token_idx = torch.tensor([0, 2, 5, 2, 3])
    weights = torch.tensor([0.5, 0.25, 1.0, 0.75, 0.1])
    fused = [(fuse_w13(e.w1, e.w3), e.w2) for e in experts]

    rows, out = run_experts(x, fused, offsets, token_idx, weights)

    per_assignment = torch.stack([
        weights[j].double() * unfused(x[token_idx[j]][None], experts[seg])[0]
        for j, seg in enumerate([0, 0, 0, 2, 2])
    ])  # fmt: skip
    # distinct tokens 0, 2, 3, 5; token 2 sums assignments 1 (expert 0) and 3 (expert 2)
    expected = torch.stack([per_assignment[0], per_assignment[1] + per_assignment[3],
                            per_assignment[4], per_assignment[2]])
    assert rows.tolist() == [0, 2, 3, 5]
    assert out.shape == (4, 8)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# ExpertWorker as a plain object
# ---------------------------------------------------------------------------------------------


def reference_forward(model: RandomModel, x: np.ndarray, expert_ids, offsets, token_idx,
                      weights) -> np.ndarray:
    """Per-row loop over the weight source's own expert weights; expert_ids are logical ids.
    One summed row per distinct token of token_idx, ascending (what a worker returns)."""
    E = model.spec.num_experts
    rows = sorted(set(np.asarray(token_idx).tolist()))
    out = np.zeros((len(rows), x.shape[1]))
    for i, g in enumerate(expert_ids):
        w = model.expert(model.spec.moe_layers[g // E], g % E)
        for j in range(offsets[i], offsets[i + 1]):
            row = unfused(torch.from_numpy(x[token_idx[j]])[None], w)[0].numpy()
            out[rows.index(int(token_idx[j]))] += weights[j] * row
    return out


def test_load_then_forward_equals_direct_computation(worker: ExpertWorker) -> None:
    model = RandomModel(SPEC, seed=11)
    # layer 0 expert 1; logical 6 = layer 1 expert 2; logical 7 = layer 1 expert 3
    loaded = worker.load([6, 1, 7])

    assert loaded == 3 * SPEC.expert_bytes()
    assert worker.hosted() == [1, 6, 7]
    x = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    expert_ids = np.array([1, 6])
    offsets = np.array([0, 3, 5])
    token_idx = np.array([0, 1, 4, 1, 3])
    weights = np.array([0.9, 0.5, 0.2, 0.5, 0.7], dtype=np.float32)

    out = worker.forward(x, ExpertShare(expert_ids, offsets, token_idx, weights))

    assert out.shape == (4, 8) and out.dtype == np.float32  # tokens 0, 1, 3, 4
    expected = reference_forward(model, x, expert_ids, offsets, token_idx, weights)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_forward_on_an_unhosted_expert_names_it(worker: ExpertWorker) -> None:
    worker.load([1])
    x = np.ones((2, 8), dtype=np.float32)

    with pytest.raises(KeyError, match=r"worker 3 has no replica of logical experts \[0, 4\]"):
        worker.forward(x, ExpertShare(np.array([0, 1, 4]), np.array([0, 1, 2, 3]), np.array([0, 1, 0]),
                                      np.ones(3, dtype=np.float32)))
    stats = worker.stats()
    assert (stats["calls"], stats["tokens"]) == (0, 0), "a refused call does not count"
    assert stats["expert_tokens"] == {1: 0}


def test_unload(worker: ExpertWorker) -> None:
    worker.load([1, 2])

    worker.unload([1, 5])  # logical 5 was never loaded: ignored

    assert worker.hosted() == [2]
    assert worker.stats()["expert_tokens"] == {2: 0}
    with pytest.raises(KeyError, match=r"logical experts \[1\]"):
        worker.forward(np.ones((1, 8), dtype=np.float32), ExpertShare(np.array([1]), np.array([0, 1]),
                       np.array([0]), np.ones(1, dtype=np.float32)))
    # an unloaded expert loads again from the weight source
    assert worker.load([1]) == SPEC.expert_bytes()
    assert worker.hosted() == [1, 2]


def test_load_skips_already_hosted_experts(worker: ExpertWorker) -> None:
    assert worker.load([1, 5]) == 2 * SPEC.expert_bytes()
    worker.forward(np.ones((2, 8), dtype=np.float32), ExpertShare(np.array([5]), np.array([0, 2]),
                   np.array([0, 1]), np.ones(2, dtype=np.float32)))

    assert worker.load([5, 1]) == 0, "nothing new to load"
    assert worker.load([5, 6]) == SPEC.expert_bytes(), "only logical 6 is new"
    assert worker.hosted() == [1, 5, 6]
    assert worker.stats()["expert_tokens"] == {1: 0, 5: 2, 6: 0}, "reloading keeps the counters"


def test_same_expert_twice_in_one_load_is_one_replica(worker: ExpertWorker) -> None:
    # a worker holds at most one replica of a logical expert
    assert worker.load([3, 3]) == SPEC.expert_bytes()

    assert worker.hosted() == [3]
    assert worker.stats()["replicas"] == 1


def test_export_then_load_from_gives_the_same_forward(worker: ExpertWorker) -> None:
    model = RandomModel(SPEC, seed=11)
    other = ExpertWorker(4, RandomModel(SPEC, seed=99), torch_threads=1, device="cpu")
    worker.load([1, 6])

    tensors = worker.export(6)  # layer 1 expert 2
    w = model.expert(1, 2)
    assert sorted(tensors) == ["w1", "w2", "w3"]
    for name, expected in (("w1", w.w1), ("w2", w.w2), ("w3", w.w3)):
        assert isinstance(tensors[name], np.ndarray) and tensors[name].dtype == np.float32
        np.testing.assert_array_equal(tensors[name], expected.numpy(), err_msg=name)

    assert other.load_from(6, tensors) == SPEC.expert_bytes()
    assert other.hosted() == [6]
    assert other.stats()["expert_tokens"] == {6: 0}
    args = (np.array([6]), np.array([0, 3]), np.array([2, 0, 3]), np.array([0.3, 1.0, 0.6], dtype=np.float32))
    x = np.random.default_rng(2).standard_normal((4, 8)).astype(np.float32)
    before = worker.forward(x, ExpertShare(*args))
    worker.unload([6])  # the source drops its copy, as a migration does

    after = other.forward(x, ExpertShare(*args))

    np.testing.assert_array_equal(after, before)
    np.testing.assert_allclose(after, reference_forward(model, x, *args), rtol=1e-5, atol=1e-6)
    # the weights came from export, not from other's own source, which holds a different expert
    assert not torch.equal(RandomModel(SPEC, seed=99).expert(1, 2).w1, w.w1)
    assert other.load([6]) == 0, "load_from counts as hosted"


def test_stats_count_calls_and_tokens(worker: ExpertWorker) -> None:
    worker.load([0, 4])
    x = np.ones((4, 8), dtype=np.float32)

    worker.forward(x, ExpertShare(np.array([0, 4]), np.array([0, 3, 4]), np.array([0, 1, 2, 3]),
                                  np.ones(4, dtype=np.float32)))
    worker.forward(x, ExpertShare(np.array([4]), np.array([0, 2]), np.array([1, 2]), np.ones(2, dtype=np.float32)))

    stats = worker.stats()
    assert {k: stats[k] for k in ("index", "replicas", "calls", "tokens", "expert_tokens")} == {
        "index": 3, "replicas": 2, "calls": 2, "tokens": 6, "expert_tokens": {0: 3, 4: 3},
    }  # fmt: skip
    assert stats["busy_s"] > 0


def test_repr_and_ready(worker: ExpertWorker) -> None:
    worker.load([0, 1])

    assert repr(worker) == f"ExpertWorker(index=3, device=cpu, pid={os.getpid()})", "only what never changes"
    ready = worker.ready()
    assert (ready["index"], ready["device"]) == (3, "cpu")
    assert isinstance(ready["pid"], int)
    if ray.is_initialized():  # the unit tier may share a process with an integration session
        assert ready["node_id"] == ray.get_runtime_context().get_node_id()
    else:
        assert ready["node_id"] == "local", "outside Ray the worker names no node"
    worker.assign(5)  # a spare's `assign`: Ray keeps the repr of the actor's start, so does the worker
    assert (worker.ready()["index"], repr(worker)) == (5, f"ExpertWorker(index=3, device=cpu, pid={os.getpid()})")
    spare = ExpertWorker(-1, RandomModel(SPEC, seed=11), torch_threads=1, device="cpu")  # pool.SPARE
    assert repr(spare) == f"ExpertWorker(started as a spare, device=cpu, pid={os.getpid()})"

