"""Datasets behind one interface (``fl.datasets.base.Dataset``), chosen by name.

Every module of this package other than ``base`` is a dataset and is
imported here, in name order, so its ``@DATASET_REGISTRY.register(...)``
runs: adding a dataset is adding a module. ``DATASETS`` lists the
registered names (what ``--dataset`` should offer).
"""

from __future__ import annotations

import importlib
import pkgutil

from fl.datasets.base import (
    DATA_ENV,
    DATASET_REGISTRY,
    DataError,
    Dataset,
    Split,
    Splits,
    dataset_of,
    load_splits,
    resolve_data_root,
    shard_digest,
)

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _module != "base" and not _module.startswith("_"):
        importlib.import_module(f"{__name__}.{_module}")

DATASETS: tuple[str, ...] = DATASET_REGISTRY.names()

__all__ = [
    "DATASETS",
    "DATASET_REGISTRY",
    "DATA_ENV",
    "DataError",
    "Dataset",
    "Split",
    "Splits",
    "dataset_of",
    "load_splits",
    "resolve_data_root",
    "shard_digest",
]
