"""The run configuration shared by ``simulate`` and (later) ``network up``.

One dataclass holds every option, so the metrics file records the complete
configuration and both front ends validate it the same way.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from fl.aggregation import AGGREGATIONS
from fl.attacks import ATTACKS
from fl.datasets import DATASETS
from fl.models import MODEL_NAMES
from fl.partition import DISTRIBUTIONS
from fl.privacy import ACCOUNTANTS, DEFAULT_REGISTRATION_SHARE, MECHANISMS
from fl.validation import RULES

SELECTIONS: tuple[str, ...] = ("weighted", "paper", "random")
SERVER_LR_DECAYS: tuple[str, ...] = ("none", "cosine")


@dataclass(frozen=True)
class RunConfig:
    dataset: str = "mnist"
    data_dir: str | None = None
    clients: int = 100
    frac: float = 0.1
    rounds: int = 50
    dist: str = "iid"
    alpha: float = 0.5
    model: str = "cnn"
    local_epochs: float = 1.0
    batch_size: int = 10
    lr: float = 0.01
    momentum: float = 0.5
    dropout: bool = True
    seed: int = 0
    aggregation: str = "fedavg"
    server_momentum: float = 0.0
    server_lr: float = 1.0
    server_lr_decay: str = "none"
    selection: str = "weighted"
    # Local differential privacy (docs/PRIVACY.md).
    dp: str = "none"
    epsilon: float = 10.0
    delta: float = 1e-5
    clip: float = 1.0
    dp_participations: int | None = None
    dp_subspace: int = 0
    dp_augmentations: int = 1
    # Accountant for the Gaussian mechanism: rdp, prv, or auto (the tighter).
    dp_accountant: str = "auto"
    # Share of epsilon spent on the registration's noisy label histogram.
    dp_registration_share: float = DEFAULT_REGISTRATION_SHARE
    # Noise from a seeded generator: no privacy at all (tests, equivalence
    # checks and testbeds only; a node refuses it outside a testbed genesis).
    reproducible_noise: bool = False
    # Trust: validation, reputation, selection.
    validation: bool = True
    val_rule: str = "relative"
    val_k: float = 3.0
    val_threshold: float = 0.5
    norm_bound: float | None = None
    val_norm_spread: bool = False
    val_cosine_spread: bool = False
    val_reference_cosine: bool = False
    reputation: bool = True
    rep_threshold: float = 0.4
    freshness: float = 0.9
    # Attacks for the robustness experiments.
    malicious: float = 0.0
    attack: str = "labelflip"
    train_size: int = 60_000
    val_size: int = 1_000
    test_size: int = 9_000
    # Intra-op threads per process; results are bit-identical only for equal counts.
    threads: int = 1

    def __post_init__(self) -> None:
        problems = list(self._problems())
        if problems:
            raise ValueError("; ".join(problems))

    def _problems(self) -> Any:
        if self.dataset not in DATASETS:
            yield f"unknown dataset {self.dataset!r} (choices: {', '.join(DATASETS)})"
        if self.clients < 1:
            yield f"--clients must be >= 1, got {self.clients}"
        if not 0 < self.frac <= 1:
            yield f"--frac must be in (0, 1], got {self.frac}"
        if self.rounds < 1:
            yield f"--rounds must be >= 1, got {self.rounds}"
        for name, value, allowed in (
            ("--dist", self.dist, DISTRIBUTIONS),
            ("--model", self.model, MODEL_NAMES),
            ("--aggregation", self.aggregation, AGGREGATIONS),
            ("--server-lr-decay", self.server_lr_decay, SERVER_LR_DECAYS),
            ("--selection", self.selection, SELECTIONS),
            ("--dp", self.dp, MECHANISMS),
            ("--dp-accountant", self.dp_accountant, ACCOUNTANTS),
            ("--val-rule", self.val_rule, RULES),
            ("--attack", self.attack, ATTACKS),
        ):
            if value not in allowed:
                yield f"{name} must be one of {', '.join(allowed)}, got {value!r}"
        if self.alpha <= 0:
            yield f"--alpha must be positive, got {self.alpha}"
        if not (self.local_epochs > 0 and math.isfinite(self.local_epochs)):
            yield f"--local-epochs must be positive, got {self.local_epochs}"
        if self.batch_size < 1:
            yield f"--batch-size must be >= 1, got {self.batch_size}"
        if not self.lr > 0:
            yield f"--lr must be positive, got {self.lr}"
        if not 0 <= self.momentum < 1:
            yield f"--momentum must be in [0, 1), got {self.momentum}"
        if self.dp != "none" and not (self.epsilon > 0 and math.isfinite(self.epsilon)):
            yield f"--epsilon must be a positive number, got {self.epsilon}"
        if not 0 < self.delta < 1:
            yield f"--delta must be in (0, 1), got {self.delta}"
        if not self.clip > 0:
            yield f"--clip must be positive, got {self.clip}"
        if self.dp_participations is not None and self.dp_participations < 1:
            yield f"--dp-participations must be >= 1, got {self.dp_participations}"
        if self.dp_augmentations < 1:
            yield f"--dp-augmentations must be >= 1, got {self.dp_augmentations}"
        elif self.dp_augmentations > 1 and self.dp == "none":
            yield "--dp-augmentations needs --dp gaussian or laplace (it shapes DP-SGD's gradients)"
        if not 0 < self.dp_registration_share < 1:
            yield (f"--dp-registration-share must be in (0, 1), got {self.dp_registration_share}")
        if self.dp_subspace < 0:
            yield f"--dp-subspace must be >= 0, got {self.dp_subspace}"
        if not 0 <= self.malicious < 1:
            yield f"--malicious must be in [0, 1), got {self.malicious}"
        if not 0 < self.freshness <= 1:
            yield f"--freshness must be in (0, 1], got {self.freshness}"
        if not 0 <= self.rep_threshold <= 1:
            yield f"--rep-threshold must be in [0, 1], got {self.rep_threshold}"
        if not 0 <= self.server_momentum < 1:
            yield f"--server-momentum must be in [0, 1), got {self.server_momentum}"
        if not self.server_lr > 0:
            yield f"--server-lr must be positive, got {self.server_lr}"
        if self.threads < 1:
            yield f"--threads must be >= 1, got {self.threads}"
        if self.clients > self.train_size:
            yield f"--clients ({self.clients}) exceeds the training samples ({self.train_size})"

    @property
    def clients_per_round(self) -> int:
        return max(1, round(self.frac * self.clients))

    @property
    def expected_records(self) -> int:
        """A client's equal share of the training set: the public figure DP plans use."""
        return max(1, self.train_size // self.clients)

    @property
    def participations_budget(self) -> int:
        """Rounds a client may join: as set, else the expected count plus 10% slack."""
        if self.dp_participations is not None:
            return self.dp_participations
        expected = self.rounds * self.clients_per_round / self.clients
        return max(1, math.ceil(1.1 * expected))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})
