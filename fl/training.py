"""Local training and evaluation (minibatch SGD with momentum).

Batches index the client's tensors directly with a seeded permutation, with
no per-item ``Dataset``/``DataLoader`` overhead, so the simulator runs at the
speed of a bare PyTorch loop (measured by ``bench/throughput.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fl.models import FLModel


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 1
    batch_size: int = 10
    lr: float = 0.01
    momentum: float = 0.5

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"local epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"learning rate must be positive, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")


@dataclass(frozen=True)
class TrainStats:
    mean_loss: float
    steps: int
    samples: int


def train_local(
    model: FLModel,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    config: TrainConfig,
    generator: torch.Generator,
) -> TrainStats:
    """Run ``config.epochs`` epochs of SGD on (x, y) in place; return the mean loss."""
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
    n = int(y.shape[0])
    total, steps = torch.zeros(()), 0
    for _ in range(config.epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, config.batch_size):
            idx = order[start : start + config.batch_size]
            masks = model.sample_masks(len(idx), generator) if model.mask_shapes else None
            loss = F.cross_entropy(model(x[idx], masks), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach()
            steps += 1
    return TrainStats(
        mean_loss=float(total) / max(steps, 1), steps=steps, samples=n * config.epochs
    )


@torch.no_grad()
def evaluate(
    model: FLModel, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 2_000
) -> tuple[float, float]:
    """(mean cross-entropy loss, accuracy as a fraction of 1) on (x, y)."""
    model.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, int(y.shape[0]), batch_size):
        logits = model(x[start : start + batch_size])
        target = y[start : start + batch_size]
        loss_sum += float(F.cross_entropy(logits, target, reduction="sum"))
        correct += int((logits.argmax(dim=1) == target).sum())
    n = max(int(y.shape[0]), 1)
    return loss_sum / n, correct / n
