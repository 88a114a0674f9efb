"""Weight loading: Mixtral checkpoints (written by transformers itself and by RandomModel),
seeded random weights, and the errors a user sees for broken checkpoints."""

from __future__ import annotations

import copy
import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import workers.hf_checkpoint as checkpoint_module
from cluster.model_spec import ModelSpec
from workers.hf_checkpoint import INDEX_FILE, SINGLE_FILE, HFCheckpoint
from workers.random_model import RandomModel, expert_key, gate_key
from workers.weights import CheckpointError, ExpertWeights, WeightSource, open_weights

SPEC = ModelSpec(
    hidden_size=8, intermediate_size=12, num_experts=4, top_k=2, moe_layers=(0, 1),
    num_hidden_layers=2,
)  # fmt: skip


def all_pairs(spec: ModelSpec) -> list[tuple[int, int]]:
    return [(layer, e) for layer in spec.moe_layers for e in range(spec.num_experts)]


def assert_experts_equal(a: ExpertWeights, b: ExpertWeights) -> None:
    for name in ("w1", "w2", "w3"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Checkpoints written by Hugging Face transformers
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_model():
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2,
        max_position_embeddings=64,
    )  # fmt: skip
    return MixtralForCausalLM(config).eval()


def hf_expert(model, layer: int, expert: int) -> ExpertWeights:
    """transformers 5.x fuses experts: gate_up_proj[e] = cat(w1, w3), down_proj[e] = w2."""
    experts = model.model.layers[layer].mlp.experts
    w1, w3 = experts.gate_up_proj[expert].detach().chunk(2, dim=0)
    return ExpertWeights(w1=w1, w2=experts.down_proj[expert].detach(), w3=w3)


@pytest.mark.parametrize(
    "save_kwargs",
    [pytest.param({}, id="single-file"), pytest.param({"max_shard_size": "10KB"}, id="sharded")],
)
def test_reads_checkpoint_saved_by_transformers(hf_model, tmp_path, save_kwargs):
    hf_model.save_pretrained(tmp_path, **save_kwargs)
    if save_kwargs:
        assert (tmp_path / INDEX_FILE).is_file()
        assert len(list(tmp_path.glob("*.safetensors"))) > 1

    ckpt = HFCheckpoint(tmp_path)

    assert ckpt.spec == ModelSpec(
        hidden_size=16, intermediate_size=24, num_experts=4, top_k=2, moe_layers=(0, 1),
        num_hidden_layers=2,
    )  # fmt: skip
    for layer in (0, 1):
        expected_gate = hf_model.model.layers[layer].mlp.gate.weight.detach()
        torch.testing.assert_close(ckpt.gate_weight(layer), expected_gate, rtol=0, atol=0)
    got = dict(ckpt.experts(all_pairs(ckpt.spec)))
    assert list(got) == all_pairs(ckpt.spec)
    for (layer, e), weights in got.items():
        assert_experts_equal(weights, hf_expert(hf_model, layer, e))
    assert not torch.equal(got[(0, 0)].w1, got[(0, 1)].w1)  # experts really differ


def test_bf16_checkpoint_is_converted_to_float32(hf_model, tmp_path):
    model = copy.deepcopy(hf_model).to(torch.bfloat16)
    model.save_pretrained(tmp_path)

    ckpt = HFCheckpoint(tmp_path)

    gate = ckpt.gate_weight(1)
    assert gate.dtype == torch.float32
    torch.testing.assert_close(gate, model.model.layers[1].mlp.gate.weight.detach().float())
    (pair, weights), = ckpt.experts([(1, 3)])
    assert pair == (1, 3)
    assert {w.dtype for w in (weights.w1, weights.w2, weights.w3)} == {torch.float32}
    bf16 = hf_expert(model, 1, 3)
    assert_experts_equal(weights, ExpertWeights(bf16.w1.float(), bf16.w2.float(), bf16.w3.float()))


# ---------------------------------------------------------------------------------------------
# RandomModel
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shards", [pytest.param(1, id="single-file"), pytest.param(3, id="3-shards")]
)
def test_random_model_roundtrips_through_mixtral_checkpoint(tmp_path, shards):
    model = RandomModel(SPEC, seed=7)

    root = model.save_mixtral_checkpoint(tmp_path / "ckpt", shards=shards)
    ckpt = HFCheckpoint(root)

    assert ckpt.spec == SPEC
    assert len(list(root.glob("*.safetensors"))) == shards
    assert (root / INDEX_FILE).is_file() == (shards > 1)
    config = json.loads((root / "config.json").read_text())
    assert config["model_type"] == "mixtral"
    assert config["architectures"] == ["MixtralForCausalLM"]
    for layer in SPEC.moe_layers:
        torch.testing.assert_close(
            ckpt.gate_weight(layer), model.gate_weight(layer), rtol=0, atol=0
        )
    for (pair, got), (same_pair, expected) in zip(
        ckpt.experts(all_pairs(SPEC)), model.experts(all_pairs(SPEC)), strict=True
    ):
        assert pair == same_pair
        assert_experts_equal(got, expected)


def test_saved_checkpoint_holds_non_moe_tensors_that_are_ignored(tmp_path):
    from safetensors import safe_open

    root = RandomModel(SPEC).save_mixtral_checkpoint(tmp_path / "ckpt")

    keys = set(safe_open(str(root / "model.safetensors"), framework="pt").keys())
    assert {"model.embed_tokens.weight", "model.layers.0.input_layernorm.weight"} <= keys
    ckpt = HFCheckpoint(root)
    assert all(".block_sparse_moe." in key for key in ckpt._files)


def test_bf16_save_reads_back_rounded_float32(tmp_path):
    model = RandomModel(SPEC, seed=3)

    ckpt = HFCheckpoint(model.save_mixtral_checkpoint(tmp_path / "ckpt", dtype=torch.bfloat16))

    (_, got), = ckpt.experts([(0, 2)])
    expected = model.expert(0, 2)
    assert got.w2.dtype == torch.float32
    torch.testing.assert_close(got.w2, expected.w2.to(torch.bfloat16).float(), rtol=0, atol=0)
    assert not torch.equal(got.w2, expected.w2)  # it really went through bf16


def test_random_experts_do_not_depend_on_order_or_company():
    pairs = all_pairs(SPEC)
    everything = dict(RandomModel(SPEC, seed=5).experts(pairs))

    reversed_subset = dict(RandomModel(SPEC, seed=5).experts(pairs[::-2]))
    single = dict(RandomModel(SPEC, seed=5).experts([(1, 2)]))

    for pair, weights in [*reversed_subset.items(), *single.items()]:
        assert_experts_equal(weights, everything[pair])
    other_seed = RandomModel(SPEC, seed=6).expert(1, 2)
    assert not torch.equal(other_seed.w1, everything[(1, 2)].w1)
    assert not torch.equal(everything[(0, 2)].w1, everything[(1, 2)].w1)
    assert not torch.equal(everything[(1, 1)].w1, everything[(1, 2)].w1)
    assert not torch.equal(everything[(1, 2)].w1, everything[(1, 2)].w3)
    assert not torch.equal(RandomModel(SPEC).gate_weight(0), RandomModel(SPEC).gate_weight(1))
    torch.testing.assert_close(RandomModel(SPEC).gate_weight(1), RandomModel(SPEC).gate_weight(1))


def test_random_expert_outputs_stay_order_one():
    spec = ModelSpec(
        hidden_size=256, intermediate_size=512, num_experts=2, top_k=1, moe_layers=(0,),
        num_hidden_layers=1,
    )  # fmt: skip
    model = RandomModel(spec, seed=0)
    x = torch.randn(64, spec.hidden_size, generator=torch.Generator().manual_seed(0))

    w = model.expert(0, 1)
    y = (torch.nn.functional.silu(x @ w.w1.T) * (x @ w.w3.T)) @ w.w2.T
    logits = x @ model.gate_weight(0).T

    assert y.shape == x.shape
    assert 0.1 < y.std().item() < 10
    assert 0.1 < logits.std().item() < 10


def test_save_refuses_non_mixtral_layouts_and_existing_checkpoints(tmp_path):
    partial = ModelSpec(
        hidden_size=8, intermediate_size=12, num_experts=4, top_k=2, moe_layers=(1,),
        num_hidden_layers=2,
    )  # fmt: skip
    with pytest.raises(ValueError, match="every layer"):
        RandomModel(partial).save_mixtral_checkpoint(tmp_path / "a")
    RandomModel(SPEC).save_mixtral_checkpoint(tmp_path / "b")
    with pytest.raises(ValueError, match="already holds a checkpoint"):
        RandomModel(SPEC).save_mixtral_checkpoint(tmp_path / "b")
    with pytest.raises(ValueError, match="shards"):
        RandomModel(SPEC).save_mixtral_checkpoint(tmp_path / "c", shards=0)


# ---------------------------------------------------------------------------------------------
# Both sources
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def sharded(tmp_path) -> Path:
    """RandomModel(SPEC, seed=1) as a 5-shard checkpoint: extras+layer 0 gate+experts 0-1,..."""
    return RandomModel(SPEC, seed=1).save_mixtral_checkpoint(tmp_path / "ckpt", shards=5)


@pytest.fixture(params=["random", "checkpoint"])
def source(request, sharded) -> WeightSource:
    return RandomModel(SPEC, seed=1) if request.param == "random" else HFCheckpoint(sharded)


def test_sources_implement_the_protocol_and_pickle_small(source):
    assert isinstance(source, WeightSource)
    blob = pickle.dumps(source)

    clone = pickle.loads(blob)

    assert len(blob) < 4096
    (_, got), = clone.experts([(1, 3)])
    (_, expected), = source.experts([(1, 3)])
    assert_experts_equal(got, expected)


def test_progress_is_called_after_each_expert(source):
    seen: list[int] = []
    pairs = [(1, 0), (0, 3), (1, 2)]

    for _ in source.experts(pairs, progress=seen.append):
        pass

    assert seen == [1, 2, 3]


@pytest.mark.parametrize(
    "pairs, match",
    [
        pytest.param([(2, 0)], "layer 2 is not an MoE layer", id="bad-layer"),
        pytest.param([(0, 4)], "expert 4 of layer 0 is out of range", id="bad-expert"),
        pytest.param([(0,)], "expected .layer, expert. pairs", id="not-a-pair"),
    ],
)
def test_experts_rejects_bad_pairs_before_reading(source, pairs, match):
    with pytest.raises(ValueError, match=match):
        source.experts(pairs)


def test_gate_weight_rejects_non_moe_layer(source):
    with pytest.raises(ValueError, match="layer 5 is not an MoE layer"):
        source.gate_weight(5)


def test_open_weights_picks_exactly_one(sharded):
    assert isinstance(open_weights(str(sharded), None, seed=0), HFCheckpoint)
    random = open_weights(None, SPEC, seed=4)
    assert isinstance(random, RandomModel) and random.seed == 4
    with pytest.raises(ValueError, match="exactly one.*got both"):
        open_weights(str(sharded), SPEC, seed=0)
    with pytest.raises(ValueError, match="exactly one.*got neither"):
        open_weights(None, None, seed=0)


# ---------------------------------------------------------------------------------------------
# Lazy reading
# ---------------------------------------------------------------------------------------------


def test_reading_a_subset_opens_each_needed_file_once(sharded, monkeypatch):
    ckpt = HFCheckpoint(sharded)
    weight_map = json.loads((sharded / INDEX_FILE).read_text())["weight_map"]
    pairs = [(1, 2), (1, 3), (1, 2)]
    needed = {weight_map[expert_key(l, e, p)] for l, e in pairs for p in ("w1", "w2", "w3")}
    opened: list[str] = []
    real_open = checkpoint_module.safe_open

    def counting_open(path, *args, **kwargs):
        opened.append(Path(path).name)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "safe_open", counting_open)
    list(ckpt.experts(pairs))

    assert sorted(opened) == sorted(needed)  # each needed file once, no other file


def test_reading_a_subset_survives_deleting_unrelated_shards(sharded):
    ckpt = HFCheckpoint(sharded)
    weight_map = json.loads((sharded / INDEX_FILE).read_text())["weight_map"]
    needed = {weight_map[expert_key(1, 3, p)] for p in ("w1", "w2", "w3")}
    unrelated = set(weight_map.values()) - needed
    assert unrelated
    for name in unrelated:
        (sharded / name).unlink()

    (pair, got), = ckpt.experts([(1, 3)])

    assert pair == (1, 3)
    assert_experts_equal(got, RandomModel(SPEC, seed=1).expert(1, 3))
    with pytest.raises(CheckpointError, match="file is missing"):
        ckpt.gate_weight(0)


# ---------------------------------------------------------------------------------------------
# Broken checkpoints
# ---------------------------------------------------------------------------------------------


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def shard_of(root: Path, key: str) -> Path:
    return root / json.loads((root / INDEX_FILE).read_text())["weight_map"][key]


def single_file_with(root: Path, key: str, tensor: torch.Tensor | None) -> None:
    """Rewrite a checkpoint as one model.safetensors where `key` is replaced (None: dropped)."""
    tensors = {}
    for (pair, w) in RandomModel(SPEC, seed=1).experts(all_pairs(SPEC)):
        tensors.update({expert_key(*pair, p): getattr(w, p) for p in ("w1", "w2", "w3")})
    tensors.update({gate_key(l): RandomModel(SPEC, seed=1).gate_weight(l) for l in (0, 1)})
    tensors.pop(key)
    if tensor is not None:
        tensors[key] = tensor
    (root / INDEX_FILE).unlink()
    for path in root.glob("*.safetensors"):
        path.unlink()
    save_file(tensors, str(root / "model.safetensors"))


W1_1_3 = expert_key(1, 3, "w1")


def _config(edit):
    return lambda root: edit_json(root / "config.json", edit)


# (break the checkpoint, when it fails: "open" or "read", file named, other words named)
BROKEN = [
    pytest.param(
        lambda root: (root / "config.json").unlink(), "open", "config.json", ["missing"],
        id="missing-config",
    ),
    pytest.param(
        lambda root: (root / "config.json").write_text("{not json"), "open", "config.json",
        ["malformed JSON"], id="malformed-config",
    ),
    pytest.param(
        _config(lambda c: c.pop("num_local_experts")), "open", "config.json",
        ["'num_local_experts'", "missing"], id="config-key-missing",
    ),
    pytest.param(
        _config(lambda c: c.update(hidden_size="8")), "open", "config.json",
        ["'hidden_size'", "'8'"], id="config-key-wrong-type",
    ),
    pytest.param(
        _config(lambda c: c.update(num_experts_per_tok=True)), "open", "config.json",
        ["'num_experts_per_tok'", "True"], id="config-key-bool",
    ),
    pytest.param(
        _config(lambda c: c.update(num_local_experts=0)), "open", "config.json",
        ["'num_local_experts'", "0"], id="config-key-zero",
    ),
    pytest.param(
        _config(lambda c: c.update(num_experts_per_tok=9)), "open", "config.json",
        ["'num_experts_per_tok' (9)", "'num_local_experts' (4)"], id="top-k-above-experts",
    ),
    pytest.param(
        _config(lambda c: c.update(architectures=["LlamaForCausalLM"])), "open", "config.json",
        ["LlamaForCausalLM", "Mixtral"], id="not-mixtral",
    ),
    pytest.param(
        lambda root: (root / INDEX_FILE).write_text("[1, 2"), "open", INDEX_FILE,
        ["malformed JSON"], id="malformed-index",
    ),
    pytest.param(
        lambda root: edit_json(root / INDEX_FILE, lambda i: i["weight_map"].pop(W1_1_3)),
        "open", INDEX_FILE, [W1_1_3, "not found"], id="key-missing-from-index",
    ),
    pytest.param(
        lambda root: shard_of(root, W1_1_3).unlink(), "open", "model-00005-of-00005.safetensors",
        ["shard file is missing", "model.layers.1."], id="index-shard-missing",
    ),
    pytest.param(
        lambda root: single_file_with(root, W1_1_3, None), "open", "model.safetensors",
        [W1_1_3, "not found"], id="key-missing-from-all-files",
    ),
    pytest.param(
        lambda root: single_file_with(root, W1_1_3, torch.zeros(12, 9)), "read",
        "model.safetensors", [W1_1_3, "[12, 9]", "expected [12, 8]"], id="wrong-shape",
    ),
    pytest.param(
        lambda root: single_file_with(root, gate_key(1), torch.zeros(4, 8, dtype=torch.int32)),
        "read", "model.safetensors", [gate_key(1), "int32"], id="integer-tensor",
    ),
    pytest.param(
        lambda root: single_file_with(root, W1_1_3, torch.zeros(12, 8).to(torch.float8_e4m3fn)),
        "read", "model.safetensors", [W1_1_3, "float8_e4m3fn", "scales"], id="fp8-tensor-without-its-scales",
    ),
    pytest.param(
        lambda root: shard_of(root, W1_1_3).write_bytes(b"\x10\x00garbage"), "read",
        "model-00005-of-00005.safetensors", ["not a readable safetensors file", "model.layers.1."],
        id="corrupt-shard",
    ),
    pytest.param(
        lambda root: (single_file_with(root, W1_1_3, None),
                      (root / "model.safetensors").write_bytes(b"junk")),
        "open", "model.safetensors", ["not a readable safetensors file"], id="corrupt-single-file",
    ),
]


@pytest.mark.parametrize("corrupt, when, file_name, words", BROKEN)
def test_broken_checkpoint_names_file_and_key(sharded, corrupt, when, file_name, words):
    corrupt(sharded)

    if when == "open":
        with pytest.raises(CheckpointError) as info:
            HFCheckpoint(sharded)
    else:
        ckpt = HFCheckpoint(sharded)  # the index is fine; the tensor data is not
        with pytest.raises(CheckpointError) as info:
            ckpt.gate_weight(1)
            list(ckpt.experts(all_pairs(SPEC)))

    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert str(sharded / file_name) in message, message
    for word in words:
        assert word in message, message


def test_path_that_is_not_a_directory(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"")

    with pytest.raises(CheckpointError, match="not a directory") as info:
        HFCheckpoint(path)
    assert str(path) in str(info.value)


def test_directory_without_weights(tmp_path):
    RandomModel(SPEC).save_mixtral_checkpoint(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "model.safetensors").unlink()

    with pytest.raises(CheckpointError, match="no model.safetensors"):
        HFCheckpoint(tmp_path / "ckpt")


def test_several_files_without_index_are_read_by_their_key_lists(sharded):
    (sharded / INDEX_FILE).unlink()

    ckpt = HFCheckpoint(sharded)

    (_, got), = ckpt.experts([(0, 1)])
    assert_experts_equal(got, RandomModel(SPEC, seed=1).expert(0, 1))


# --- Qwen2-MoE and DeepSeek checkpoints: shared experts, correction bias, shared gate --------


def _family_checkpoint(tmp_path: Path, family: str) -> Path:
    """A tiny checkpoint saved by transformers itself for `family`."""
    transformers = pytest.importorskip("transformers")
    small = dict(vocab_size=32, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                 moe_intermediate_size=16)
    if family == "qwen2_moe":
        config = transformers.Qwen2MoeConfig(**small, shared_expert_intermediate_size=40, num_experts=4,
                                             num_experts_per_tok=2, num_key_value_heads=2)
    else:
        config = transformers.DeepseekV3Config(**small, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=2,
                                               num_experts_per_tok=2, first_k_dense_replace=1, n_group=4, topk_group=2,
                                               kv_lora_rank=8, q_lora_rank=None, qk_rope_head_dim=4,
                                               qk_nope_head_dim=4, v_head_dim=8)
    torch.manual_seed(0)
    path = tmp_path / family
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


def _rewrite(path: Path, edit) -> None:
    from safetensors.torch import load_file

    tensors = load_file(str(path / SINGLE_FILE))
    edit(tensors)
    save_file(tensors, str(path / SINGLE_FILE), metadata={"format": "pt"})


def test_qwen2_moe_spec_shared_expert_and_its_gate(tmp_path):
    path = _family_checkpoint(tmp_path, "qwen2_moe")
    ckpt = HFCheckpoint(path)
    spec = ckpt.spec
    assert (spec.family, spec.shared_intermediate_size, spec.num_shared_experts, spec.experts_per_layer) == (
        "qwen2_moe", 40, 3, 7)  # 40 = 16 + 16 + 8, the last piece zero-padded
    assert spec.gate.shared_gate and not spec.gate.correction_bias
    gate = ckpt.gate(1)
    assert gate.shared_gate.shape == (1, 32) and gate.correction_bias is None
    last = dict(ckpt.experts([(1, 6)]))[(1, 6)]
    assert last.w1.shape == (16, 32) and (last.w1[8:] == 0).all() and (last.w2[:, 8:] == 0).all()


def test_deepseek_v3_spec_dense_first_layer_and_correction_bias(tmp_path):
    path = _family_checkpoint(tmp_path, "deepseek_v3")
    spec = HFCheckpoint(path).spec
    assert (spec.moe_layers, spec.dense_layers, spec.num_shared_experts) == ((1,), (0,), 2)
    assert (spec.gate.scoring, spec.gate.n_group, spec.gate.topk_group, spec.gate.correction_bias) == (
        "sigmoid", 4, 2, True)
    assert HFCheckpoint(path).gate(1).correction_bias.shape == (8,)


@pytest.mark.parametrize(("family", "key"), [
    ("deepseek_v3", "model.layers.1.mlp.gate.e_score_correction_bias"),
    ("deepseek_v3", "model.layers.1.mlp.shared_experts.up_proj.weight"),
    ("qwen2_moe", "model.layers.0.mlp.shared_expert_gate.weight"),
])
def test_a_missing_shared_or_gate_tensor_is_named(tmp_path, family, key):
    path = _family_checkpoint(tmp_path, family)
    _rewrite(path, lambda tensors: tensors.pop(key))
    with pytest.raises(CheckpointError, match=f"tensor '{key}' not found"):
        HFCheckpoint(path)


def test_a_shared_expert_of_the_wrong_size_is_refused_at_read(tmp_path):
    path = _family_checkpoint(tmp_path, "qwen2_moe")
    key = "model.layers.1.mlp.shared_expert.gate_proj.weight"
    _rewrite(path, lambda tensors: tensors.update({key: torch.zeros(48, 32)}))
    with pytest.raises(CheckpointError, match=r"has shape \[48, 32\], expected \[40, 32\]"):
        list(HFCheckpoint(path).experts([(1, 4)]))


def test_an_unknown_deepseek_v2_routing_method_is_refused(tmp_path):
    path = _family_checkpoint(tmp_path, "deepseek_v3")
    edit_json(path / "config.json", lambda c: c.update(architectures=["DeepseekV2ForCausalLM"], model_type="deepseek_v2",
                                                       topk_method="noaux_tc"))
    with pytest.raises(CheckpointError, match="'topk_method' is 'noaux_tc'.*greedy"):
        HFCheckpoint(path)


@pytest.mark.parametrize(("edit", "words"), [
    (lambda c: c.update(hidden_act="tanh"), ["hidden_act", "'tanh'", "not served", "silu", "gelu"]),
    (lambda c: c.update(n_group=3), ["n_group", "8", "3"]),
    (lambda c: c.update(topk_group=5), ["topk_group", "n_group"]),
    (lambda c: c.update(quantization_config={"quant_method": "awq", "bits": 4}),
     ["quantization_config.quant_method", "'awq'", "not served", "'fp8'", "BF16"]),
    (lambda c: c.update(architectures=["GraniteMoeForCausalLM"]), ["GraniteMoeForCausalLM", "not supported",
                                                                    "DeepseekV3ForCausalLM"]),
])
def test_bad_family_configs_are_refused_naming_the_key(tmp_path, edit, words):
    path = _family_checkpoint(tmp_path, "deepseek_v3")
    edit_json(path / "config.json", edit)
    with pytest.raises(CheckpointError) as caught:
        HFCheckpoint(path)
    assert all(w in str(caught.value) for w in words), str(caught.value)
    assert "config.json" in str(caught.value)
