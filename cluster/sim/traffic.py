"""Skewed traffic for demos, tests and benchmarks: hidden states that the real gate routes to
Zipf-distributed target experts, with a hot set that can rotate over time.

For MoE layer l with gate `W [E, H]`, the hidden state `d_e = pinv(W) (margin * onehot(e))`
gives expert e the logit `margin` and every other expert 0. A token aimed at experts
(e1, e2, ...) drawn from the Zipf popularity is `d_e1 + 0.75 d_e2 + 0.75^2 d_e3 ...` plus
Gaussian noise, so the gate picks e1 first, e2 second, and so on.
"""

from __future__ import annotations

import numpy as np
import torch


def zipf_probs(num_experts: int, s: float) -> np.ndarray:
    """`[E]` popularity by rank: p_rank ∝ 1 / rank**s (rank 1 is the hottest)."""
    if s < 0:
        raise ValueError(f"Zipf exponent s must be >= 0, got {s}")
    weights = 1.0 / np.arange(1, num_experts + 1) ** s
    return weights / weights.sum()


class SkewedTraffic:
    """gate_weights: `{layer: [E, H]}`; s: Zipf exponent; margin: target logit; noise: std of
    the added Gaussian noise per hidden dimension; aim: distinct experts each token is aimed at
    (set it to the model's top_k to skew every pick, 1 to skew only the first)."""

    def __init__(self, gate_weights: dict[int, torch.Tensor], s: float = 1.2, seed: int = 0,
                 margin: float = 8.0, noise: float = 0.05, aim: int = 1):
        self._rng = np.random.default_rng(seed)
        self._directions = {
            layer: (torch.linalg.pinv(w.double()) * margin).T.float().numpy()  # [E, H]
            for layer, w in gate_weights.items()
        }
        self.num_experts = next(iter(gate_weights.values())).shape[0]
        self.hidden_size = next(iter(gate_weights.values())).shape[1]
        if not 1 <= aim <= self.num_experts:
            raise ValueError(f"aim must be in 1..{self.num_experts}, got {aim}")
        self.s = s
        self.aim = aim
        self._noise = noise
        self._by_rank = self._rng.permutation(self.num_experts)  # expert id of each rank
        self._probs = zipf_probs(self.num_experts, s)

    @property
    def hot_experts(self) -> np.ndarray:
        """Expert ids from hottest to coldest."""
        return self._by_rank.copy()

    def expert_probs(self) -> np.ndarray:
        """`[E]` probability that a token is aimed at each expert."""
        probs = np.empty(self.num_experts)
        probs[self._by_rank] = self._probs
        return probs

    def rotate(self, shift: int = 1) -> None:
        """Move the hot set: the expert at rank r becomes the one at rank r + shift."""
        self._by_rank = np.roll(self._by_rank, shift)

    def targets(self, tokens: int) -> np.ndarray:
        """`[tokens, aim]` distinct experts per token, each pick drawn by popularity among the
        experts not picked yet (Gumbel top-k over log-probabilities)."""
        gumbel = self._rng.gumbel(size=(tokens, self.num_experts))
        scores = np.log(self.expert_probs())[None, :] + gumbel
        return np.argsort(-scores, axis=1)[:, : self.aim]

    def sample(self, layer: int, tokens: int) -> tuple[np.ndarray, np.ndarray]:
        """`([tokens, H] float32 hidden states, [tokens, aim] target expert ids, first = top-1)`."""
        targets = self.targets(tokens)
        scale = 0.75 ** np.arange(self.aim, dtype=np.float32)
        hidden = np.einsum("tah,a->th", self._directions[layer][targets], scale)
        hidden += self._rng.standard_normal(hidden.shape, dtype=np.float32) * self._noise
        return hidden.astype(np.float32), targets
