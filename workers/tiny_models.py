"""Tiny random models of every family we serve, built with `transformers`' own config and model
classes, so that a checkpoint saved from one (`save_pretrained`) is in the family's real layout,
with a real tokenizer beside it (`tokenizer.json`, `tokenizer_config.json` and a chat template),
trained offline with the `tokenizers` library on a small made-up corpus.

For tests, benchmarks and smoke checks (`moe-serve verify` on one of these proves the whole path
without downloading a model). Needs `transformers`; weights are random with std 0.1, so gates
have clear winners. `save` writes float32 or, with `dtype`, BF16 / FP16 as `save_pretrained` does;
`save_fp8` then requantizes the expert matrices into FP8 blocks with their `weight_scale_inv`, in
the DeepSeek-V3 layout (the real tensor names and scale shapes, `quantization_config` in
config.json)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from cluster.model_spec import causal_lm_class

SMALL = dict(vocab_size=48, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
             max_position_embeddings=64, initializer_range=0.1, bos_token_id=1, eos_token_id=2)
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2: the models' bos_token_id and eos_token_id
ALPHABET = "abcdefghijklmnopqrstuvwxyz ,.!?:'\n"
WORDS = ("the cat sat on a mat and the dog ran far to sea under a big red sun while the moon rose over "
         "quiet hills where birds sing of rain snow wind fire stone river light dark old new").split()
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")
DEEPSEEK_ATTENTION = dict(num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
                          qk_nope_head_dim=8, v_head_dim=16)


@dataclass(frozen=True)
class TinyFamily:
    """name: a case name; family: `ModelSpec.family`; config: `transformers` -> its config;
    dense: layers with a plain MLP; shared: shared-expert pieces the spec has; seed: weights."""

    name: str
    family: str
    config: Callable[[Any], Any]
    dense: tuple[int, ...]
    shared: int
    seed: int

    def with_seed(self, seed: int) -> TinyFamily:
        return replace(self, seed=seed)

    def build(self) -> torch.nn.Module:
        """The model, float32, eval; the correction biases (DeepSeek-V3, GLM-4.5) and expert
        biases (gpt-oss) are made non-zero, as in a trained model, so that they change which
        experts are chosen and what they add."""
        import transformers

        torch.manual_seed(self.seed)
        model = causal_lm_class(self.config(transformers))(self.config(transformers)).eval()
        with torch.no_grad():
            for name, tensor in [*model.named_buffers(), *model.named_parameters()]:
                if name.endswith(("e_score_correction_bias", "experts.gate_up_proj_bias", "experts.down_proj_bias")):
                    tensor.copy_(0.3 * torch.randn_like(tensor))
        return model

    def save(self, path: str | Path, tokenizer: bool = True, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        """Build and save the model to `path` with `save_pretrained` in `dtype` (float32, bfloat16,
        float16), with a tokenizer of its vocabulary beside it (unless `tokenizer` is false: MoE
        weights and config only); returns the model, in `dtype`."""
        model = self.build().to(dtype)
        model.save_pretrained(path)
        if tokenizer:
            build_tokenizer(model.config.vocab_size, seed=self.seed).save_pretrained(path)
        return model

    def save_fp8(self, path: str | Path, block: tuple[int, int], tokenizer: bool = True,
                 dense: bool = False, strategy: str | None = None) -> torch.nn.Module:
        """`save`, then every routed and shared expert matrix `....weight` rewritten as
        float8_e4m3fn with `....weight_scale_inv` float32 `[ceil(R/bm), ceil(C/bn)]` (block
        `[bm, bn]`; `dense`: the attention projections too, as DeepSeek-V3 ships them), and
        `quantization_config` (`quant_method: fp8`, `weight_block_size`) added to config.json.
        `strategy` ("channel", "tensor" or "block"): compressed-tensors' float-quantized layout
        instead, as llm-compressor writes it (GLM-4.5-FP8): `....weight_scale` `[R, 1]`, `[1]` or
        per block, and a static `....input_scale` `[1]` beside each matrix.
        Returns the float32 model it was saved from."""
        from safetensors.torch import load_file, save_file

        from workers.hf_checkpoint import CONFIG_FILE, SINGLE_FILE, HFCheckpoint
        from workers.quant import quantize_fp8

        model = self.save(path, tokenizer)
        root = Path(path)
        ckpt = HFCheckpoint(root)
        spec, layout = ckpt.spec, ckpt.layout
        keys = {layout.expert_key(layer, e, p) for layer in spec.moe_layers for e in range(spec.num_experts)
                for p in ("w1", "w2", "w3")}
        keys |= {layout.shared_key(layer, p) for layer in spec.moe_layers if spec.num_shared_experts
                 for p in ("w1", "w2", "w3")}
        tensors = load_file(str(root / SINGLE_FILE))
        if dense:
            keys |= {k for k, t in tensors.items() if ".self_attn." in k and k.endswith("proj.weight") and t.dim() == 2}
        for key in sorted(keys):
            rows, cols = tensors[key].shape
            tiles = {"channel": (1, cols), "tensor": (rows, cols)}.get(strategy, block)
            q = quantize_fp8(tensors[key], tiles)
            tensors[key] = q.data
            if strategy is None:
                tensors[key + "_scale_inv"] = q.scale_inv
            else:
                tensors[key + "_scale"] = q.scale_inv.reshape(1) if strategy == "tensor" else q.scale_inv
                tensors[key.removesuffix(".weight") + ".input_scale"] = torch.tensor([0.01])
        save_file(tensors, str(root / SINGLE_FILE), metadata={"format": "pt"})
        config = json.loads((root / CONFIG_FILE).read_text())
        config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                         "weight_block_size": list(block)} if strategy is None else {
            "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {
                "targets": ["Linear"],
                "weights": {"num_bits": 8, "type": "float", "strategy": strategy, "symmetric": True, "dynamic": False,
                            "block_structure": list(block) if strategy == "block" else None},
                "input_activations": {"num_bits": 8, "type": "float", "strategy": "tensor", "symmetric": True,
                                      "dynamic": False}}},
            "ignore": ["lm_head"] + [f"model.layers.{layer}.mlp.gate" for layer in spec.moe_layers]}
        (root / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        return model


def build_tokenizer(vocab_size: int, seed: int = 0, corpus_lines: int = 400):
    """A byte-pair tokenizer of exactly `vocab_size` tokens (at least the alphabet and the special
    tokens, 38), trained on seeded made-up sentences, wrapped as `transformers`' fast tokenizer
    with `<s>` / `</s>` and a plain chat template (`role: content` lines, then `assistant:`)."""
    import random

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    alphabet = list(dict.fromkeys(ALPHABET))
    smallest = len(alphabet) + len(SPECIAL_TOKENS) + 1  # + the metaspace marker
    if vocab_size < smallest:
        raise ValueError(f"vocab_size {vocab_size} is below the {smallest} tokens of the alphabet and special tokens")
    rng = random.Random(seed)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 16))) for _ in range(corpus_lines)]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), initial_alphabet=alphabet,
                                  limit_alphabet=len(alphabet) + 1, show_progress=False)
    tokenizer.train_from_iterator(corpus, trainer)
    for i in range(tokenizer.get_vocab_size(), vocab_size):  # a corpus too small for every merge: fill up
        tokenizer.add_tokens([f"<extra_{i}>"])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _qwen3(norm: bool):
    return lambda t: t.Qwen3MoeConfig(
        **SMALL, moe_intermediate_size=48, num_experts=6, num_experts_per_tok=2, norm_topk_prob=norm,
        mlp_only_layers=[0], decoder_sparse_step=1, num_key_value_heads=2, head_dim=16)


def _qwen2(t):
    return t.Qwen2MoeConfig(
        **SMALL, moe_intermediate_size=24, shared_expert_intermediate_size=40, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=False, mlp_only_layers=[0], decoder_sparse_step=1, num_key_value_heads=2)


def _deepseek_v2(method: str):
    return lambda t: t.DeepseekV2Config(
        **SMALL, **DEEPSEEK_ATTENTION, moe_intermediate_size=24, n_routed_experts=8, n_shared_experts=2,
        num_experts_per_tok=3, first_k_dense_replace=1, topk_method=method, n_group=4, topk_group=2,
        routed_scaling_factor=1.5)


def _deepseek_v3(t):
    return t.DeepseekV3Config(
        **{**SMALL, **DEEPSEEK_ATTENTION, "q_lora_rank": 24}, moe_intermediate_size=24, n_routed_experts=8,
        n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, norm_topk_prob=True)


def _glm4_moe(t):
    return t.Glm4MoeConfig(
        **SMALL, moe_intermediate_size=24, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
        first_k_dense_replace=1, n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True,
        num_key_value_heads=2, head_dim=16)


def _mistral4(t):
    return t.Mistral4Config(
        **{**SMALL, **DEEPSEEK_ATTENTION, "q_lora_rank": 24}, moe_intermediate_size=24, n_routed_experts=8,
        n_shared_experts=1, num_experts_per_tok=3, first_k_dense_replace=1, n_group=4, topk_group=2,
        routed_scaling_factor=1.5, norm_topk_prob=True, architectures=["Mistral4ForCausalLM"],
        rope_parameters={"type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
                         "max_position_embeddings": 64, "beta_fast": 32.0, "beta_slow": 1.0, "mscale_all_dim": 1.0,
                         "mscale": 1.0, "llama_4_scaling_beta": 0.1})


def _dbrx(t):
    return t.DbrxConfig(
        d_model=64, n_heads=4, n_layers=3, max_seq_len=64, vocab_size=48, initializer_range=0.1, bos_token_id=1,
        eos_token_id=2, attn_config={"kv_n_heads": 2, "clip_qkv": 0.6, "rope_theta": 10000.0},
        ffn_config={"ffn_hidden_size": 32, "moe_num_experts": 4, "moe_top_k": 2, "moe_normalize_expert_weights": 1.0,
                    "ffn_act_fn": {"name": "silu"}})


def _gpt_oss(t):
    return t.GptOssConfig(
        **{**SMALL, "intermediate_size": 32}, num_local_experts=4, num_experts_per_tok=2, num_key_value_heads=2,
        head_dim=16, sliding_window=4, swiglu_limit=1.0, layer_types=["sliding_attention", "full_attention"] * 1
        + ["sliding_attention"], rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


def _llama4(t):
    return t.Llama4TextConfig(
        **SMALL, intermediate_size_mlp=80, num_local_experts=4, num_experts_per_tok=1, moe_layers=[1, 2],
        num_key_value_heads=2, head_dim=16, no_rope_layers=[1, 1, 1], attention_chunk_size=8,
        architectures=["Llama4ForCausalLM"])


def _mixtral_gelu(t):
    return t.MixtralConfig(**SMALL, num_local_experts=6, num_experts_per_tok=2, num_key_value_heads=2,
                           hidden_act="gelu")


def _mixtral(t):
    return t.MixtralConfig(**SMALL, num_local_experts=6, num_experts_per_tok=2, num_key_value_heads=2)


FAMILIES = (
    TinyFamily("mixtral", "mixtral", _mixtral, (), 0, 2),
    TinyFamily("qwen3-renormalised", "qwen3_moe", _qwen3(True), (0,), 0, 3),
    TinyFamily("qwen3-raw-softmax", "qwen3_moe", _qwen3(False), (0,), 0, 4),
    TinyFamily("qwen2-shared-expert", "qwen2_moe", _qwen2, (0,), 2, 5),  # 40 = 24 + 16 (+ 8 zero rows)
    TinyFamily("deepseek-v2-greedy", "deepseek_v2", _deepseek_v2("greedy"), (0,), 2, 6),
    TinyFamily("deepseek-v2-group-limited", "deepseek_v2", _deepseek_v2("group_limited_greedy"), (0,), 2, 7),
    TinyFamily("deepseek-v3", "deepseek_v3", _deepseek_v3, (0,), 1, 8),
    TinyFamily("mixtral-gelu-experts", "mixtral", _mixtral_gelu, (), 0, 9),
    TinyFamily("glm4-moe", "glm4_moe", _glm4_moe, (0,), 1, 10),
    TinyFamily("mistral4", "mistral4", _mistral4, (0,), 1, 11),
    TinyFamily("dbrx", "dbrx", _dbrx, (), 0, 12),
    TinyFamily("gpt-oss", "gpt_oss", _gpt_oss, (), 0, 13),
    TinyFamily("llama4", "llama4", _llama4, (0,), 1, 14),
)
BY_NAME = {f.name: f for f in FAMILIES}
