"""Misbehaving clients for the robustness experiments (``--attack``).

- ``labelflip``: trains honestly on labels ``K - 1 - y`` for K classes
  (``9 - y`` on MNIST; Biggio et al. 2012).
- ``noise``: sends Gaussian noise (std 0.5 per coordinate) instead of its update.
- ``scale``: sends its honest update multiplied by -10 (a boosted, sign-flipped
  update, after Bhagoji et al. 2019 "model replacement").
- ``nan``: sends an update full of NaN.
- ``silent``: is selected but sends nothing.
- ``lie``: declares the largest data size, perfect quality and every class,
  but its labels are random, so its update is poor.
- ``inflate``: claims the largest record count the run admits (the record
  cap, ``--max-records``), spread over every class, and sends a zero update:
  it bets on FedAvg's weight to drag the global model back.

Each attack is an :class:`Attack` registered in ``ATTACK_REGISTRY`` under its
name; it overrides what it changes (the registration, the labels, the update,
or whether anything is sent), so a new attack is one more registered class.

The malicious set is drawn from the run seed, so it is reproducible and is
listed in the metrics.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch

from fl.registry import Registry

NOISE_STD = 0.5
SCALE_FACTOR = -10.0


class Attack:
    """What a malicious client does differently; the defaults behave honestly."""

    # Selected, it sends no update at all.
    silent: bool = False

    def registration(
        self, *, claimed_records: int, max_records: int, num_classes: int
    ) -> tuple[int, ...] | None:
        """The histogram it registers instead of its noisy one (None: the honest release).

        ``claimed_records`` is the size that scores 1.0 in self-assessment,
        ``max_records`` the largest the run admits (its record cap).
        """
        return None

    def labels(
        self, y: torch.Tensor, *, num_classes: int, generator: torch.Generator
    ) -> torch.Tensor:
        """The labels it trains on."""
        return y

    def update(
        self, delta: OrderedDict[str, torch.Tensor], *, generator: torch.Generator
    ) -> OrderedDict[str, torch.Tensor]:
        """The update it sends in place of ``delta``."""
        return delta


ATTACK_REGISTRY: Registry[type[Attack]] = Registry("attack")


@ATTACK_REGISTRY.register("labelflip")
class LabelFlip(Attack):
    def labels(
        self, y: torch.Tensor, *, num_classes: int, generator: torch.Generator
    ) -> torch.Tensor:
        return (num_classes - 1) - y


@ATTACK_REGISTRY.register("noise")
class NoiseUpdate(Attack):
    def update(
        self, delta: OrderedDict[str, torch.Tensor], *, generator: torch.Generator
    ) -> OrderedDict[str, torch.Tensor]:
        return OrderedDict(
            (k, NOISE_STD * torch.randn(v.shape, generator=generator, dtype=v.dtype))
            for k, v in delta.items()
        )


@ATTACK_REGISTRY.register("scale")
class ScaledUpdate(Attack):
    def update(
        self, delta: OrderedDict[str, torch.Tensor], *, generator: torch.Generator
    ) -> OrderedDict[str, torch.Tensor]:
        return OrderedDict((k, SCALE_FACTOR * v) for k, v in delta.items())


@ATTACK_REGISTRY.register("nan")
class NanUpdate(Attack):
    def update(
        self, delta: OrderedDict[str, torch.Tensor], *, generator: torch.Generator
    ) -> OrderedDict[str, torch.Tensor]:
        return OrderedDict((k, torch.full_like(v, float("nan"))) for k, v in delta.items())


@ATTACK_REGISTRY.register("silent")
class Silent(Attack):
    silent = True


def spread(records: int, *, num_classes: int) -> tuple[int, ...]:
    """A histogram of ``records`` records spread evenly over every class, none invalid."""
    per_class, extra = divmod(records, num_classes)
    return (*(per_class + (c < extra) for c in range(num_classes)), 0)


@ATTACK_REGISTRY.register("lie")
class Liar(Attack):
    def registration(
        self, *, claimed_records: int, max_records: int, num_classes: int
    ) -> tuple[int, ...] | None:
        # Twice the equal share, spread over every class, no invalid label.
        per_class = -(-claimed_records // num_classes)
        return (per_class,) * num_classes + (0,)

    def labels(
        self, y: torch.Tensor, *, num_classes: int, generator: torch.Generator
    ) -> torch.Tensor:
        return torch.randint(0, num_classes, y.shape, generator=generator)


@ATTACK_REGISTRY.register("inflate")
class Inflate(Attack):
    def registration(
        self, *, claimed_records: int, max_records: int, num_classes: int
    ) -> tuple[int, ...] | None:
        return spread(max_records, num_classes=num_classes)

    def update(
        self, delta: OrderedDict[str, torch.Tensor], *, generator: torch.Generator
    ) -> OrderedDict[str, torch.Tensor]:
        return OrderedDict((k, torch.zeros_like(v)) for k, v in delta.items())


ATTACKS: tuple[str, ...] = ATTACK_REGISTRY.names()


def attack_of(name: str) -> Attack:
    """The attack registered as ``name``."""
    return ATTACK_REGISTRY.get(name)()


def choose_malicious(
    client_ids: list[str], *, fraction: float, rng: np.random.Generator
) -> list[str]:
    count = round(fraction * len(client_ids))
    chosen = rng.choice(len(client_ids), size=count, replace=False)
    return sorted(client_ids[i] for i in chosen)


def poison_labels(
    attack: str, y: torch.Tensor, *, generator: torch.Generator, num_classes: int
) -> torch.Tensor:
    """The labels a malicious client trains on (unchanged for update-level attacks)."""
    return attack_of(attack).labels(y, num_classes=num_classes, generator=generator)


def poison_update(
    attack: str, delta: OrderedDict[str, torch.Tensor], *, generator: torch.Generator
) -> OrderedDict[str, torch.Tensor]:
    """The update a malicious client sends in place of ``delta``."""
    return attack_of(attack).update(delta, generator=generator)
