"""The old home of the MNIST reader: its public names, re-exported.

Datasets now live in ``fl.datasets`` (one module each behind
``fl.datasets.base.Dataset``; MNIST in ``fl.datasets.mnist``). ``MnistSplits``
is ``fl.datasets.Splits``.
"""

from __future__ import annotations

from fl.datasets.base import (
    DATA_ENV,
    DataError,
    Split,
    Splits,
    evaluation_order,
    resolve_data_root,
    shard_digest,
)
from fl.datasets.mnist import (
    IMAGE_MAGIC,
    LABEL_MAGIC,
    MNIST_FILES,
    MNIST_MEAN,
    MNIST_STD,
    NUM_CLASSES,
    MnistFile,
    content_md5,
    find_file,
    load_mnist,
    parse_idx,
    raw_dir,
    read_bytes,
)

MnistSplits = Splits

__all__ = [
    "DATA_ENV",
    "IMAGE_MAGIC",
    "LABEL_MAGIC",
    "MNIST_FILES",
    "MNIST_MEAN",
    "MNIST_STD",
    "NUM_CLASSES",
    "DataError",
    "MnistFile",
    "MnistSplits",
    "Split",
    "Splits",
    "content_md5",
    "evaluation_order",
    "find_file",
    "load_mnist",
    "parse_idx",
    "raw_dir",
    "read_bytes",
    "resolve_data_root",
    "shard_digest",
]
