"""The dataset interface: splits, the :class:`Dataset` base class and its registry.

A dataset is one module of this package defining a :class:`Dataset`
subclass registered in ``DATASET_REGISTRY`` under its ``--dataset`` name. It
states what the rest of the code needs to know about the data (the class
count, the shape of one example, the model that fits it, the value an empty
pixel has after normalisation) and loads the three splits: the clients'
training records, the miners' validation set and the test set accuracy is
reported on. Code that needs any of this asks ``dataset_of(config)`` instead
of assuming MNIST.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from fl.registry import Registry

DATA_ENV = "LLBCFL_DATA"


class DataError(Exception):
    """A data file is missing, truncated or not what it claims to be."""


def resolve_data_root(data_dir: str | os.PathLike[str] | None) -> Path:
    """``--data-dir`` if given, else ``$LLBCFL_DATA``, else ``./data``."""
    if data_dir:
        return Path(data_dir)
    env = os.environ.get(DATA_ENV)
    return Path(env) if env else Path("data")


@dataclass(frozen=True)
class Split:
    """Normalised examples ``x`` (N, *input_shape) float32 and labels ``y`` (N,) int64."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass(frozen=True)
class Splits:
    """The clients' training records, the miners' validation set, the test set."""

    train: Split
    validation: Split
    test: Split


def shard_digest(x: torch.Tensor, y: torch.Tensor) -> bytes:
    """SHA-256 of a client's records (shapes, float32 images, int64 labels).

    Binds a privacy ledger to the data it accounts for: runs on the same
    records compose their privacy spend, whatever network they belong to.
    """
    h = hashlib.sha256(b"LLBCFL/shard/v1")
    images = x.detach().to(torch.float32).contiguous()
    labels = y.detach().to(torch.int64).contiguous()
    for t in (images, labels):
        h.update(len(t.shape).to_bytes(4, "big"))
        for dim in t.shape:
            h.update(int(dim).to_bytes(8, "big"))
        h.update(t.numpy().astype(t.numpy().dtype.newbyteorder("<"), copy=False).tobytes())
    return h.digest()


def evaluation_order(n: int) -> np.ndarray:
    """A fixed shuffle of ``range(n)``: indices sorted by SHA-256 of a label and
    the index, so every node and every run (and anyone else) gets the same
    order without a random number generator."""
    keys = [hashlib.sha256(b"llbcfl/evaluation-order/%d" % i).digest() for i in range(n)]
    return np.array(sorted(range(n), key=keys.__getitem__), dtype=np.int64)


class Dataset:
    """One dataset: what the code needs to know about it, and how to load it.

    ``name`` is its ``--dataset`` name (the key it is registered under);
    ``num_classes`` the label count (labels are ``0 .. num_classes - 1``,
    and a registration histogram has ``num_classes + 1`` bins);
    ``input_shape`` the shape of one example, channels first;
    ``default_model`` the ``--model`` that fits it;
    ``pad_value`` what an empty pixel is after normalisation (what the DP
    augmentation shifts in).
    """

    name: ClassVar[str]
    num_classes: ClassVar[int]
    input_shape: ClassVar[tuple[int, ...]]
    default_model: ClassVar[str] = "cnn"
    pad_value: ClassVar[float] = 0.0

    def load(self, root: Path, *, train_size: int, val_size: int, test_size: int) -> Splits:
        """The three splits, of the given sizes; ``root`` is the data directory."""
        raise NotImplementedError


DATASET_REGISTRY: Registry[type[Dataset]] = Registry("dataset")


def dataset_of(config: Any) -> Dataset:
    """The dataset ``config.dataset`` names (or, given a string, the one it names)."""
    name = config if isinstance(config, str) else config.dataset
    return DATASET_REGISTRY.get(name)()


def load_splits(config: Any, *, data_dir: str | None = None, train: bool = True) -> Splits:
    """The splits of ``config.dataset`` at the sizes ``config`` sets, from ``data_dir``
    (else ``config.data_dir``, else ``$LLBCFL_DATA``, else ``./data``).

    ``train=False`` loads a single training record: miners use only the
    validation split and the server only the test split (60,000 MNIST
    images as float32 are 188 MB, about 600 MB at peak while converting).
    """
    return dataset_of(config).load(
        resolve_data_root(data_dir or config.data_dir),
        train_size=config.train_size if train else 1,
        val_size=config.val_size,
        test_size=config.test_size,
    )
