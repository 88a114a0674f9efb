"""Tiny random models of every family we serve, built with `transformers`' own config and model
classes, so that a checkpoint saved from one (`save_pretrained`) is in the family's real layout,
with a real tokenizer beside it (`tokenizer.json`, `tokenizer_config.json` and a chat template),
trained offline with the `tokenizers` library on a small made-up corpus.

For tests, benchmarks and smoke checks (`moe-serve verify` on one of these proves the whole path
without downloading a model). Needs `transformers`; weights are random with std 0.1, so gates
have clear winners."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

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
        """The model, float32, eval; DeepSeek-V3's correction bias is made non-zero, as in a
        trained model, so that it changes which experts are chosen."""
        import transformers

        torch.manual_seed(self.seed)
        model = transformers.AutoModelForCausalLM.from_config(self.config(transformers)).eval()
        with torch.no_grad():
            for layer in model.model.layers:
                bias = getattr(getattr(layer.mlp, "gate", None), "e_score_correction_bias", None)
                if bias is not None:
                    bias.copy_(0.3 * torch.randn_like(bias))
        return model

    def save(self, path: str | Path, tokenizer: bool = True) -> torch.nn.Module:
        """Build and save the model to `path` with `save_pretrained`, with a tokenizer of its
        vocabulary beside it (unless `tokenizer` is false: MoE weights and config only); returns
        the model."""
        model = self.build()
        model.save_pretrained(path)
        if tokenizer:
            build_tokenizer(model.config.vocab_size, seed=self.seed).save_pretrained(path)
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
)
BY_NAME = {f.name: f for f in FAMILIES}
