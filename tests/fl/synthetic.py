"""Small synthetic 'digits' for fast, exact tests (no MNIST files needed)."""

from __future__ import annotations

import torch

from fl.data import MnistSplits, Split


def synthetic_split(n: int, *, seed: int) -> Split:
    """Ten separable classes: class c lights up a distinct 4x4 patch of a 28x28 image."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 10
    y = y[torch.randperm(n, generator=g)]
    x = 0.2 * torch.randn(n, 1, 28, 28, generator=g)
    for i, c in enumerate(y.tolist()):
        r, col = divmod(c, 5)
        x[i, 0, 4 + 10 * r : 8 + 10 * r, 2 + 5 * col : 6 + 5 * col] += 3.0
    return Split(x=x, y=y)


def synthetic_splits(n_train: int = 2_000, n_val: int = 200, n_test: int = 200) -> MnistSplits:
    return MnistSplits(
        train=synthetic_split(n_train, seed=1),
        validation=synthetic_split(n_val, seed=2),
        test=synthetic_split(n_test, seed=3),
    )
