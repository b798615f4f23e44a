"""Data with a known answer, for the tests and the benchmarks (as numpy.testing and torch.testing are).

- ``linear_ratings``: features and labels whose best Gaussian value head is known exactly (each
  attribute's noise std is ``NOISE``), and ``LINEAR_RATINGS_TRAINING``, the stage-1 settings under
  which the losses are compared on them (tests/test_train.py asserts, bench/sigma_recovery.py reports).
- ``shortest_real_pairs``: the shortest pairs of a real preference file (multi-turn, mixed lengths):
  real rows that a 2-core CPU embeds with SmolLM2 in minutes.
"""

from __future__ import annotations

import os

import torch

NOISE = torch.tensor([0.2, 0.4, 0.6, 0.8, 1.0])  # true label noise std per attribute
# The AdamW settings the gradient losses are compared under (one head, the loss named beside them)
LINEAR_RATINGS_TRAINING = dict(ensemble=1, lr=1e-2, batch_size=256, epochs=300, patience=20, device="cpu")


def linear_ratings(n: int = 4000, d: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Features h [n, d] (float16, h[0] = 1: real hidden states carry a constant direction) and labels
    y = h A + 2 + noise of std NOISE_k [n, 5]: the best value head has sigma_k = NOISE_k exactly."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g)
    h[:, 0] = 1.0
    h = h.half()
    a = torch.randn(d, len(NOISE), generator=g) * 0.5
    y = h.float() @ a + 2.0 + torch.randn(n, len(NOISE), generator=g) * NOISE
    return h, y


def shortest_real_pairs(n: int, source: str | os.PathLike) -> list:
    """The n pairs of a real preference file with the fewest characters, in file order."""
    from pipeline.data.preferences import load_preferences

    pairs, _ = load_preferences(str(source))
    size = [sum(len(m["content"]) for m in p.chosen + p.rejected) for p in pairs]
    keep = sorted(range(len(pairs)), key=lambda i: (size[i], i))[:n]
    return [pairs[i] for i in sorted(keep)]
