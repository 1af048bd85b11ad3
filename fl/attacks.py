"""Misbehaving clients for the robustness experiments (``--attack``).

- ``labelflip``: trains honestly on labels ``9 - y`` (Biggio et al. 2012).
- ``noise``: sends Gaussian noise (std 0.5 per coordinate) instead of its update.
- ``scale``: sends its honest update multiplied by -10 (a boosted, sign-flipped
  update, after Bhagoji et al. 2019 "model replacement").
- ``nan``: sends an update full of NaN.
- ``silent``: is selected but sends nothing.
- ``lie``: declares the largest data size, perfect quality and every class,
  but its labels are random, so its update is poor.

The malicious set is drawn from the run seed, so it is reproducible and is
listed in the metrics.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch

ATTACKS: tuple[str, ...] = ("labelflip", "noise", "scale", "nan", "silent", "lie")
NOISE_STD = 0.5
SCALE_FACTOR = -10.0


def choose_malicious(
    client_ids: list[str], *, fraction: float, rng: np.random.Generator
) -> list[str]:
    count = round(fraction * len(client_ids))
    chosen = rng.choice(len(client_ids), size=count, replace=False)
    return sorted(client_ids[i] for i in chosen)


def poison_labels(attack: str, y: torch.Tensor, *, generator: torch.Generator) -> torch.Tensor:
    """The labels a malicious client trains on (unchanged for update-level attacks)."""
    if attack == "labelflip":
        return 9 - y
    if attack == "lie":
        return torch.randint(0, 10, y.shape, generator=generator)
    return y


def poison_update(
    attack: str, delta: OrderedDict[str, torch.Tensor], *, generator: torch.Generator
) -> OrderedDict[str, torch.Tensor]:
    """The update a malicious client sends in place of ``delta``."""
    if attack == "noise":
        return OrderedDict(
            (k, NOISE_STD * torch.randn(v.shape, generator=generator, dtype=v.dtype))
            for k, v in delta.items()
        )
    if attack == "scale":
        return OrderedDict((k, SCALE_FACTOR * v) for k, v in delta.items())
    if attack == "nan":
        return OrderedDict((k, torch.full_like(v, float("nan"))) for k, v in delta.items())
    return delta
