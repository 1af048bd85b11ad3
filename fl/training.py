"""Local training and evaluation (minibatch SGD with momentum).

Batches index the client's tensors directly with a seeded permutation, with
no per-item ``Dataset``/``DataLoader`` overhead, so the simulator runs at the
speed of a bare PyTorch loop (measured by ``bench/throughput.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from fl.datasets.mnist import MNIST_BLACK
from fl.models import FLModel
from fl.privacy import (
    DPConfig,
    NoiseSource,
    StepPlan,
    clipped_sum,
    local_steps,
    noisy_average,
    poisson_mask,
)

# Records whose per-sample gradients are held at once in DP training (a
# memory bound only: the clipped sum does not depend on it beyond rounding).
PER_SAMPLE_CHUNK = 100
# Augmented copies are shifted by up to this many pixels in each direction;
# pixels shifted in are empty (the dataset's ``pad_value``; by default
# MNIST's black, the normalised value of 0).
MAX_SHIFT = 2
BLACK = MNIST_BLACK


@dataclass(frozen=True)
class TrainConfig:
    epochs: float = 1.0
    batch_size: int = 10
    lr: float = 0.01
    momentum: float = 0.5
    # The model's dropout while training (models without dropout ignore it).
    dropout: bool = True
    # DP training only: per-sample gradients averaged over this many copies
    # of each record (the record itself and randomly shifted copies) before
    # clipping; 1 = no augmentation.
    augmentations: int = 1
    # What the augmentation's shifts move in: an empty pixel of the dataset.
    pad_value: float = BLACK

    def __post_init__(self) -> None:
        if not self.epochs > 0:
            raise ValueError(f"local epochs must be positive, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"learning rate must be positive, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.augmentations < 1:
            raise ValueError(f"augmentations must be >= 1, got {self.augmentations}")


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
    budget = local_steps(n_samples=n, batch_size=config.batch_size, local_epochs=config.epochs)
    total, steps, samples = torch.zeros(()), 0, 0
    while steps < budget:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, config.batch_size):
            if steps == budget:
                break
            idx = order[start : start + config.batch_size]
            masks = (
                model.sample_masks(len(idx), generator)
                if config.dropout and model.mask_shapes
                else None
            )
            loss = F.cross_entropy(model(x[idx], masks), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach()
            steps += 1
            samples += len(idx)
    return TrainStats(mean_loss=float(total) / max(steps, 1), steps=steps, samples=samples)


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


def per_sample_gradients(model: FLModel, *, n_masks: int = 0) -> Callable[..., Any]:
    """``f(params, xs, ys, *masks) -> (grads, losses)``: the cross-entropy
    gradient of each example of ``xs`` with respect to ``params`` (a name ->
    tensor dict), as a dict of ``[batch, *shape]`` tensors, and each example's
    loss; ``vmap`` over ``grad`` of a ``functional_call`` (``torch.func``), so
    the model needs no wrapping. ``n_masks`` dropout masks (0 or
    ``len(model.mask_shapes)``) are plain inputs, sliced per example like the data.
    """

    def sample_loss(
        p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor, *masks: torch.Tensor
    ):
        batch_masks = [m.unsqueeze(0) for m in masks] if masks else None
        logits = functional_call(model, p, (xi.unsqueeze(0), batch_masks))
        loss = F.cross_entropy(logits, yi.unsqueeze(0))
        return loss, loss.detach()

    return vmap(grad(sample_loss, has_aux=True), in_dims=(None, 0, 0, *([0] * n_masks)))


def train_local_dp(
    model: FLModel,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    config: TrainConfig,
    dp: DPConfig,
    plan: StepPlan,
    released_records: int,
    noise: NoiseSource,
    generator: torch.Generator,
    projection: torch.Tensor | None = None,
) -> TrainStats:
    """DP-SGD on (x, y) in place (Abadi et al. 2016), ``plan.steps`` steps.

    ``noise`` draws what the privacy proof needs secret: the noise and the
    Poisson sampling mask (``fl.privacy.SecretNoise`` unless reproducible
    noise was asked for). ``generator`` draws what it does not: dropout
    masks and augmentation shifts, which the clipping bounds whatever they
    are. Each noisy gradient sum is divided by ``plan.sample_rate *
    released_records``, the public record count of the client's registration.

    With ``projection`` (a public ``[params, r]`` matrix, see
    ``subspace_projection``) each per-sample gradient is first projected to
    ``r`` dimensions, clipped and noised there, and the noisy step is mapped
    back: training in a random subspace (Li et al. 2018, "Measuring the
    Intrinsic Dimension of Objective Landscapes").  Noise then grows with
    ``r`` instead of the parameter count, which is what makes the Laplace
    mechanism (L1 clipping) usable at all.  The projection does not depend
    on the data, so the privacy analysis is unchanged.

    With ``config.augmentations`` = K > 1 each record's gradient is the mean
    of the per-sample gradients of K copies of it (the record and K - 1
    random shifts, ``augmented_copies``) before clipping: augmentation
    multiplicity (De et al. 2022, "Unlocking High-Accuracy Differentially
    Private Image Classification through Scale").  A record still adds one
    vector clipped to C, so the sensitivity and the privacy analysis are
    unchanged; the averaged gradient is less noisy, so more of the clipped
    sum is signal.

    Each step Poisson-samples the records at rate ``plan.sample_rate`` (the
    accounting in ``fl.privacy`` assumes exactly that; at rate 1 it takes
    every record and draws nothing), takes per-sample
    gradients with ``torch.func`` (``per_sample_gradients``), ``PER_SAMPLE_CHUNK``
    records at a time, and hands them to ``clipped_sum`` and ``noisy_average``
    (``fl.privacy``) for clipping, noise and averaging.  Momentum acts on the
    privatised gradient, which is post-processing.
    """
    model.train()
    params = {k: v.detach() for k, v in model.named_parameters()}
    names = list(params)
    shapes = [params[k].shape for k in names]
    n_masks = len(model.mask_shapes) if config.dropout else 0
    per_sample = per_sample_gradients(model, n_masks=n_masks)
    n = int(y.shape[0])
    width = sum(p.numel() for p in params.values())
    velocity = torch.zeros(width)
    flat_params = torch.cat([params[k].reshape(-1) for k in names])
    total, steps, samples = 0.0, 0, 0
    copies = config.augmentations
    chunk = max(1, PER_SAMPLE_CHUNK // copies)
    for _ in range(plan.steps):
        chosen = poisson_mask(n, sample_rate=plan.sample_rate, noise=noise)
        masks = model.sample_masks(len(chosen), generator) if n_masks and len(chosen) else []
        # All of the step's shifts at once, so they do not depend on the chunking.
        shifts = random_shifts(copies - 1, len(chosen), generator) if copies > 1 else None
        summed = torch.zeros(width if projection is None else projection.shape[1])
        loss_sum = 0.0
        # Per-sample gradients a chunk at a time: the sum of clipped rows is
        # all DP-SGD needs, and [batch, params] for a 600-sample batch would
        # cost a few hundred MB at once.
        for start in range(0, len(chosen), chunk):
            part = chosen[start : start + chunk]
            xs, ys = x[part], y[part]
            part_masks = [m[start : start + len(part)] for m in masks]
            if shifts is not None:
                xs = augmented_copies(
                    xs, shifts[:, start : start + len(part)], pad_value=config.pad_value
                ).flatten(end_dim=1)
                ys = ys.repeat(copies)
                part_masks = [m.repeat(copies, *([1] * (m.dim() - 1))) for m in part_masks]
            grads, losses = per_sample(params, xs, ys, *part_masks)
            flat = torch.cat([grads[k].reshape(len(xs), -1) for k in names], dim=1)
            if copies > 1:  # one gradient per record: the mean over its copies
                flat = flat.view(copies, len(part), -1).mean(dim=0)
                losses = losses.view(copies, len(part)).mean(dim=0)
            if projection is not None:
                flat = flat @ projection
            summed += clipped_sum(flat, config=dp)
            loss_sum += float(losses.sum())
        if len(chosen):
            total += loss_sum / len(chosen)
            samples += len(chosen)
        noisy = noisy_average(
            summed, config=dp, plan=plan, released_records=released_records, noise=noise
        )
        if projection is not None:
            noisy = projection @ noisy
        velocity = config.momentum * velocity + noisy
        flat_params = flat_params - config.lr * velocity
        params = _unflatten_params(flat_params, names, shapes)
        steps += 1
    with torch.no_grad():
        for name, value in params.items():
            model.get_parameter(name).copy_(value)
    return TrainStats(mean_loss=total / max(steps, 1), steps=steps, samples=samples)


def shift_images(
    x: torch.Tensor, shifts: torch.Tensor, *, pad_value: float = BLACK
) -> torch.Tensor:
    """Each image of ``x`` ([n, C, H, W]) moved by its (down, right) pixels in
    ``shifts`` ([n, 2] integers within ``MAX_SHIFT``); pixels moved in are
    ``pad_value`` (MNIST's black by default)."""
    n, c, h, w = x.shape
    if shifts.shape != (n, 2) or (n and int(shifts.abs().max()) > MAX_SHIFT):
        raise ValueError(f"shifts must be [{n}, 2] within +-{MAX_SHIFT}, got {tuple(shifts.shape)}")
    m = MAX_SHIFT
    padded = F.pad(x, (m, m, m, m), value=pad_value)
    rows = torch.arange(h) + m - shifts[:, :1]  # [n, h]: source row of each output row
    cols = torch.arange(w) + m - shifts[:, 1:]  # [n, w]
    return padded[
        torch.arange(n)[:, None, None, None],
        torch.arange(c)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]


def random_shifts(copies: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """``[copies, n, 2]`` (down, right) shifts, uniform in +-``MAX_SHIFT``."""
    return torch.randint(-MAX_SHIFT, MAX_SHIFT + 1, (copies, n, 2), generator=generator)


def augmented_copies(
    x: torch.Tensor, shifts: torch.Tensor, *, pad_value: float = BLACK
) -> torch.Tensor:
    """``[1 + len(shifts), n, C, H, W]``: the images themselves, then one shifted
    version of them per ``[n, 2]`` entry of ``shifts``."""
    return torch.stack([x, *(shift_images(x, s, pad_value=pad_value) for s in shifts)])


def _unflatten_params(
    flat: torch.Tensor, names: list[str], shapes: list[torch.Size]
) -> dict[str, torch.Tensor]:
    out, offset = {}, 0
    for name, shape in zip(names, shapes, strict=True):
        size = shape.numel()
        out[name] = flat[offset : offset + size].view(shape)
        offset += size
    return out


def subspace_projection(*, params: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """A ``[params, dim]`` Gaussian matrix, entries N(0, 1/params): near-orthonormal columns."""
    return torch.randn(params, dim, generator=generator) / params**0.5
