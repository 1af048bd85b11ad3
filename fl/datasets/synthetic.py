"""Synthetic 'digits' for fast, exact tests and smoke runs (no files needed).

Ten separable classes of 28x28 images: class ``c`` lights up a distinct 4x4
patch on a background of N(0, 0.2^2) noise. The three splits are drawn from
fixed seeds (1, 2 and 3), so the same sizes always give the same records.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fl.datasets.base import DATASET_REGISTRY, Dataset, Split, Splits

NUM_CLASSES = 10


def synthetic_split(n: int, *, seed: int) -> Split:
    """``n`` records: class c lights up a distinct 4x4 patch of a 28x28 image."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % NUM_CLASSES
    y = y[torch.randperm(n, generator=g)]
    x = 0.2 * torch.randn(n, 1, 28, 28, generator=g)
    for c in range(NUM_CLASSES):
        r, col = divmod(c, 5)
        x[y == c, 0, 4 + 10 * r : 8 + 10 * r, 2 + 5 * col : 6 + 5 * col] += 3.0
    return Split(x=x, y=y)


def synthetic_splits(n_train: int = 2_000, n_val: int = 200, n_test: int = 200) -> Splits:
    return Splits(
        train=synthetic_split(n_train, seed=1),
        validation=synthetic_split(n_val, seed=2),
        test=synthetic_split(n_test, seed=3),
    )


@DATASET_REGISTRY.register("synthetic")
class Synthetic(Dataset):
    """The synthetic digits above; ``root`` is ignored."""

    name = "synthetic"
    num_classes = NUM_CLASSES
    input_shape = (1, 28, 28)
    default_model = "cnn"
    pad_value = 0.0

    def load(self, root: Path, *, train_size: int, val_size: int, test_size: int) -> Splits:
        if train_size < 1 or val_size < 1 or test_size < 1:
            raise ValueError(
                f"split sizes must be >= 1, got {train_size}, {val_size} and {test_size}"
            )
        return synthetic_splits(train_size, val_size, test_size)
