"""The run configuration shared by ``simulate`` and (later) ``network up``.

One dataclass holds every option, so the metrics file records the complete
configuration and both front ends validate it the same way.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from fl.aggregation import AGGREGATIONS
from fl.models import MODEL_NAMES
from fl.partition import DISTRIBUTIONS

SELECTIONS: tuple[str, ...] = ("random",)


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
    local_epochs: int = 1
    batch_size: int = 10
    lr: float = 0.01
    momentum: float = 0.5
    seed: int = 0
    aggregation: str = "fedavg"
    selection: str = "random"
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
        if self.dataset != "mnist":
            yield f"unknown dataset {self.dataset!r} (only 'mnist' is supported)"
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
            ("--selection", self.selection, SELECTIONS),
        ):
            if value not in allowed:
                yield f"{name} must be one of {', '.join(allowed)}, got {value!r}"
        if self.alpha <= 0:
            yield f"--alpha must be positive, got {self.alpha}"
        if self.local_epochs < 1:
            yield f"--local-epochs must be >= 1, got {self.local_epochs}"
        if self.batch_size < 1:
            yield f"--batch-size must be >= 1, got {self.batch_size}"
        if not self.lr > 0:
            yield f"--lr must be positive, got {self.lr}"
        if not 0 <= self.momentum < 1:
            yield f"--momentum must be in [0, 1), got {self.momentum}"
        if self.threads < 1:
            yield f"--threads must be >= 1, got {self.threads}"
        if self.clients > self.train_size:
            yield f"--clients ({self.clients}) exceeds the training samples ({self.train_size})"

    @property
    def clients_per_round(self) -> int:
        return max(1, round(self.frac * self.clients))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})
