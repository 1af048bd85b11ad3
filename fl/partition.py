"""Splitting the training set among clients.

- ``iid``: a seeded permutation cut into equal shards.
- ``noniid``: McMahan et al. 2017 ("Communication-Efficient Learning of Deep
  Networks from Decentralized Data"): sort by label, cut into
  ``clients * shards_per_client`` shards (200 shards of 300 for 100 clients),
  give each client ``shards_per_client`` random shards.
- ``dirichlet``: per class, split its samples among clients in proportions
  drawn from Dirichlet(alpha) (Hsu et al. 2019); smaller alpha is more skewed.

Each function returns one sorted ``int64`` index array per client; together
they are disjoint and cover every sample (``noniid`` drops the remainder when
the count does not divide evenly). ``partition`` dispatches through
``DISTRIBUTION_REGISTRY``, where each scheme is registered under its
``--dist`` name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fl.registry import Registry

Distribution = str  # a name registered in DISTRIBUTION_REGISTRY


@dataclass(frozen=True)
class ShardSummary:
    """What a client can say publicly about its shard (used for self-assessment)."""

    n_samples: int
    classes_present: tuple[int, ...]


def partition_iid(
    *, n_samples: int, num_clients: int, rng: np.random.Generator
) -> list[np.ndarray]:
    perm = rng.permutation(n_samples)
    return [np.sort(part) for part in np.array_split(perm, num_clients)]


def partition_shards(
    *, labels: np.ndarray, num_clients: int, shards_per_client: int, rng: np.random.Generator
) -> list[np.ndarray]:
    num_shards = num_clients * shards_per_client
    shard_size = len(labels) // num_shards
    if shard_size == 0:
        raise ValueError(f"{len(labels)} samples cannot fill {num_shards} shards")
    # Stable sort keeps the order inside a class fixed, so shards are reproducible.
    order = np.argsort(labels, kind="stable")[: num_shards * shard_size]
    shards = order.reshape(num_shards, shard_size)
    assignment = rng.permutation(num_shards).reshape(num_clients, shards_per_client)
    return [np.sort(shards[row].reshape(-1)) for row in assignment]


def partition_dirichlet(
    *,
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
    min_samples: int = 10,
    max_tries: int = 100,
) -> list[np.ndarray]:
    if alpha <= 0:
        raise ValueError(f"dirichlet alpha must be positive, got {alpha}")
    classes = np.unique(labels)
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet(np.full(num_clients, alpha))) * len(idx)).astype(int)
            for client, chunk in enumerate(np.split(idx, cuts[:-1])):
                parts[client].append(chunk)
        shards = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(s) for s in shards) >= min_samples:
            return shards
    raise ValueError(
        f"could not give every client {min_samples} samples with alpha={alpha} "
        f"in {max_tries} tries; raise alpha or lower the client count"
    )


# A scheme: (labels, num_clients, rng, alpha, shards_per_client) -> one index array per client.
Scheme = Callable[..., list[np.ndarray]]
DISTRIBUTION_REGISTRY: Registry[Scheme] = Registry("distribution")


@DISTRIBUTION_REGISTRY.register("iid")
def _iid(
    *, labels: np.ndarray, num_clients: int, rng: np.random.Generator, **_: object
) -> list[np.ndarray]:
    return partition_iid(n_samples=len(labels), num_clients=num_clients, rng=rng)


@DISTRIBUTION_REGISTRY.register("noniid")
def _noniid(
    *,
    labels: np.ndarray,
    num_clients: int,
    rng: np.random.Generator,
    shards_per_client: int,
    **_: object,
) -> list[np.ndarray]:
    return partition_shards(
        labels=labels, num_clients=num_clients, shards_per_client=shards_per_client, rng=rng
    )


@DISTRIBUTION_REGISTRY.register("dirichlet")
def _dirichlet(
    *, labels: np.ndarray, num_clients: int, rng: np.random.Generator, alpha: float, **_: object
) -> list[np.ndarray]:
    return partition_dirichlet(labels=labels, num_clients=num_clients, alpha=alpha, rng=rng)


DISTRIBUTIONS: tuple[str, ...] = DISTRIBUTION_REGISTRY.names()


def partition(
    *,
    dist: Distribution,
    labels: np.ndarray,
    num_clients: int,
    rng: np.random.Generator,
    alpha: float = 0.5,
    shards_per_client: int = 2,
) -> list[np.ndarray]:
    if num_clients < 1 or num_clients > len(labels):
        raise ValueError(f"client count must be in 1..{len(labels)}, got {num_clients}")
    scheme = DISTRIBUTION_REGISTRY.get(dist)
    return scheme(
        labels=labels,
        num_clients=num_clients,
        rng=rng,
        alpha=alpha,
        shards_per_client=shards_per_client,
    )


def summarize(labels: np.ndarray) -> ShardSummary:
    return ShardSummary(
        n_samples=len(labels), classes_present=tuple(int(c) for c in np.unique(labels))
    )
