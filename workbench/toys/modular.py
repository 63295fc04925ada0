"""Modular addition, the built-in grokking task (Power et al. 2022; Nanda et al. 2023).

Each sample is the token sequence ``[a, b, =]`` and the model must predict ``(a + b) mod p`` at the last
position. A seeded fraction of the p² pairs is the training set; the rest is the test set.
"""

from __future__ import annotations

import torch

from workbench.samples import SampleSet


def modular_addition(p: int, train_fraction: float, seed: int = 0) -> SampleSet:
    """All p² pairs as a SampleSet with groups ``train`` and ``test``.

    Token ids 0..p-1 are the numbers and ``p`` is the ``=`` sign, so the vocabulary has p + 1 tokens.
    """
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    a, b = a.flatten(), b.flatten()
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(p * p, generator=gen)
    n_train = int(round(train_fraction * p * p))
    is_train = torch.zeros(p * p, dtype=torch.bool)
    is_train[order[:n_train]] = True
    inputs = torch.stack([a, b, torch.full_like(a, p)], dim=1)
    targets = torch.full_like(inputs, -100)
    targets[:, -1] = (a + b) % p
    ids = [f"{int(x)}+{int(y)}" for x, y in zip(a, b)]
    groups = ["train" if t else "test" for t in is_train.tolist()]
    return SampleSet(
        ids=ids,
        groups=groups,
        input_ids=[row.tolist() for row in inputs],
        targets=[row.tolist() for row in targets],
    )


class ModularTokenizer:
    """Token text for the modular-addition samples: ids 0..p-1 are the numbers, ``p`` is ``=``."""

    def __init__(self, p: int):
        self.p = p

    def tokens(self, ids) -> list[str]:
        return ["=" if int(i) == self.p else str(int(i)) for i in ids]
