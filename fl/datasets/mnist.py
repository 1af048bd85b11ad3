"""MNIST in torchvision's on-disk layout, read without torchvision.

The four IDX files live in ``ROOT/MNIST/raw/`` either gzip-compressed
(``*-ubyte.gz``) or plain (``*-ubyte``).  IDX is LeCun's format: a big-endian
header (magic 2051 for images, 2049 for labels, the item count, then rows and
columns for images) followed by raw ``uint8`` values.

This module only reads local files; downloading lives in ``commands.datafetch``.
Splits: every training image goes to the clients;
the test images are taken in a fixed public order (:func:`evaluation_order`),
the first ``val_size`` of it are the miners' validation set, and accuracy is
reported on the next ``test_size``.  The order is shuffled because MNIST's
test file is not: its first 5,000 digits are markedly harder than its last
5,000 (a model at 95% on the whole set scores about 1.5 points less on the
first half), so a contiguous slice would misstate test accuracy.
"""

from __future__ import annotations

import gzip
import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fl.datasets.base import (
    DATA_ENV,
    DATASET_REGISTRY,
    DataError,
    Dataset,
    Split,
    Splits,
    evaluation_order,
)

IMAGE_MAGIC = 2051
LABEL_MAGIC = 2049
NUM_CLASSES = 10
# Normalisation used by the PyTorch MNIST example and most FL papers.
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
# A black pixel, normalised.
MNIST_BLACK = (0.0 - MNIST_MEAN) / MNIST_STD


@dataclass(frozen=True)
class MnistFile:
    """One of the four files, with the MD5 of its official ``.gz`` and of its content."""

    name: str
    gz_md5: str
    raw_md5: str


MNIST_FILES: tuple[MnistFile, ...] = (
    MnistFile(
        "train-images-idx3-ubyte",
        "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "6bbc9ace898e44ae57da46a324031adb",
    ),
    MnistFile(
        "train-labels-idx1-ubyte",
        "d53e105ee54ea40749a09fcbcd1e9432",
        "a25bea736e30d166cdddb491f175f624",
    ),
    MnistFile(
        "t10k-images-idx3-ubyte",
        "9fb629c4189551a2d022fa330f9573f3",
        "2646ac647ad5339dbf082846283269ea",
    ),
    MnistFile(
        "t10k-labels-idx1-ubyte",
        "ec29112dd5afa0611ce80d1b7f02629c",
        "27ae3e4e09519cfbb04c329615203637",
    ),
)


def raw_dir(root: Path) -> Path:
    return root / "MNIST" / "raw"


def find_file(root: Path, name: str) -> Path | None:
    """The plain or gzip-compressed copy of ``name`` under ``root``, if any."""
    for candidate in (raw_dir(root) / name, raw_dir(root) / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def read_bytes(path: Path) -> bytes:
    """File content, decompressed when the name ends in ``.gz``."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                return fh.read()
        return path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"{path}: cannot read ({exc}); delete it and fetch again") from exc


def parse_idx(content: bytes, *, expected_magic: int, source: str = "<bytes>") -> np.ndarray:
    """Parse IDX bytes into a ``uint8`` array, checking magic and exact length."""
    if len(content) < 8:
        raise DataError(f"{source}: truncated: {len(content)} bytes is shorter than an IDX header")
    magic, count = struct.unpack(">II", content[:8])
    if magic != expected_magic:
        raise DataError(
            f"{source}: wrong magic number {magic} (expected {expected_magic}); "
            "not an MNIST IDX file of this kind"
        )
    header = 8
    shape: tuple[int, ...] = (count,)
    if expected_magic == IMAGE_MAGIC:
        if len(content) < 16:
            raise DataError(f"{source}: truncated: image header needs 16 bytes")
        rows, cols = struct.unpack(">II", content[8:16])
        header, shape = 16, (count, rows, cols)
    expected = header + int(np.prod(shape))
    if len(content) != expected:
        kind = "truncated" if len(content) < expected else "has trailing bytes"
        raise DataError(f"{source}: {kind}: expected {expected} bytes, found {len(content)}")
    return np.frombuffer(content, dtype=np.uint8, offset=header).reshape(shape)


def content_md5(path: Path) -> str:
    return hashlib.md5(read_bytes(path)).hexdigest()


def _to_split(images: np.ndarray, labels: np.ndarray) -> Split:
    # One float32 copy, normalised in place: 60,000 images are 188 MB, and
    # out-of-place arithmetic would hold three such copies at once.
    x = torch.from_numpy(images.astype(np.float32))
    x.div_(255.0).sub_(MNIST_MEAN).div_(MNIST_STD)
    return Split(x=x.unsqueeze(1), y=torch.from_numpy(labels.astype(np.int64)))


def _read(root: Path, name: str, magic: int) -> np.ndarray:
    path = find_file(root, name)
    if path is None:
        raise DataError(
            f"MNIST file {name}[.gz] not found under {raw_dir(root)}. Run "
            "`python cli.py data fetch --data-dir DIR`, or point --data-dir / "
            f"${DATA_ENV} at a folder holding MNIST/raw/."
        )
    return parse_idx(read_bytes(path), expected_magic=magic, source=str(path))


def load_mnist(
    root: Path, *, train_size: int = 60_000, val_size: int = 1_000, test_size: int = 9_000
) -> Splits:
    """Read the four files and cut the train / validation / test splits."""
    train_x = _read(root, "train-images-idx3-ubyte", IMAGE_MAGIC)
    train_y = _read(root, "train-labels-idx1-ubyte", LABEL_MAGIC)
    test_x = _read(root, "t10k-images-idx3-ubyte", IMAGE_MAGIC)
    test_y = _read(root, "t10k-labels-idx1-ubyte", LABEL_MAGIC)
    if len(train_x) != len(train_y) or len(test_x) != len(test_y):
        raise DataError(f"{raw_dir(root)}: image and label counts differ")
    if not 0 < train_size <= len(train_x):
        raise DataError(f"train size {train_size} must be in 1..{len(train_x)}")
    if val_size < 1 or test_size < 1 or val_size + test_size > len(test_x):
        raise DataError(
            f"validation ({val_size}) + test ({test_size}) must be positive and fit "
            f"in the {len(test_x)} test images"
        )
    order = evaluation_order(len(test_x))
    val_idx, test_idx = order[:val_size], order[val_size : val_size + test_size]
    return Splits(
        train=_to_split(train_x[:train_size], train_y[:train_size]),
        validation=_to_split(test_x[val_idx], test_y[val_idx]),
        test=_to_split(test_x[test_idx], test_y[test_idx]),
    )


@DATASET_REGISTRY.register("mnist")
class Mnist(Dataset):
    """LeCun's handwritten digits: 60,000 training and 10,000 test images, 28x28 grey."""

    name = "mnist"
    num_classes = NUM_CLASSES
    input_shape = (1, 28, 28)
    default_model = "cnn"
    pad_value = MNIST_BLACK

    def load(self, root: Path, *, train_size: int, val_size: int, test_size: int) -> Splits:
        return load_mnist(root, train_size=train_size, val_size=val_size, test_size=test_size)
