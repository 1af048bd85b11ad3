"""The server's checkpoints: the global model after each round, and resuming from them.

``RUN_DIR/checkpoints/round-NNNN.pt`` holds what :class:`chain.models.GlobalModels`
needs to aggregate the rounds after NNNN (docs/NETWORK.md, "One round", step 5): the
round, the weights after it, and the FedAvgM server velocity (absent without
server momentum). Files are written atomically (temporary file, fsync,
rename) and read with ``torch.load(weights_only=True)``, so a checkpoint
file cannot run code.

A restarted server trusts a checkpoint of round r only if the digest of its
weights equals the model digest in the committed ``RoundSummary`` of round r,
which every miner recomputed from the chain before voting for it; a
checkpoint newer than the last committed summary is not trusted (its summary
may never have committed). :func:`newest_trusted_checkpoint` returns the
newest checkpoint that passes, skipping with a warning every newer one that
is unreadable, malformed, from another run or altered.
"""

from __future__ import annotations

import io
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import torch

from chain.digests import ModelSpec, model_spec, weights_digest
from chain.records import RoundSummary
from fl.weights import flatten
from node.durable import write_durably

CHECKPOINT_NAME: Final = re.compile(r"round-(\d+)\.pt")


class CheckpointError(Exception):
    """A checkpoint file that cannot be used (unreadable, malformed or not this run's)."""


@dataclass(frozen=True)
class Checkpoint:
    round: int
    weights: OrderedDict[str, torch.Tensor]  # after the round, in the model's order
    velocity: torch.Tensor | None  # FedAvgM velocity after the round (None without momentum)


def checkpoint_path(directory: Path, rnd: int) -> Path:
    return Path(directory) / f"round-{rnd:04d}.pt"


def write_checkpoint(directory: Path, checkpoint: Checkpoint) -> Path:
    """Write ``checkpoint`` atomically under ``directory``; return its path."""
    path = checkpoint_path(directory, checkpoint.round)
    path.parent.mkdir(parents=True, exist_ok=True)
    document: dict[str, Any] = {"round": checkpoint.round, "weights": dict(checkpoint.weights)}
    if checkpoint.velocity is not None:
        document["velocity"] = checkpoint.velocity
    buffer = io.BytesIO()
    torch.save(document, buffer)
    write_durably(path, buffer.getvalue(), mode=0o644)
    return path


def read_checkpoint(path: Path, *, spec: ModelSpec, with_velocity: bool) -> Checkpoint:
    """The checkpoint in ``path``, checked against the model ``spec``.

    ``with_velocity``: the run uses server momentum, so the checkpoint must
    carry a velocity (one value per model parameter); without it, it must not.
    Raises :class:`CheckpointError` for anything else.
    """
    named = CHECKPOINT_NAME.fullmatch(path.name)
    if named is None:
        raise CheckpointError("not named round-NNNN.pt")
    try:
        document = torch.load(io.BytesIO(path.read_bytes()), weights_only=True)
    except Exception as exc:  # any torn, truncated or hostile file
        # torch's messages run over several lines: keep the log to one.
        first_line = next(iter(str(exc).strip().splitlines()), "")[:200]
        raise CheckpointError(f"unreadable ({type(exc).__name__}: {first_line})") from exc
    rnd = document.get("round") if isinstance(document, dict) else None
    if type(rnd) is not int or rnd != int(named.group(1)):
        raise CheckpointError("its round is not the one in its name")
    stored = document.get("weights")
    if not isinstance(stored, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in stored.items()
    ):
        raise CheckpointError("no weights")
    try:
        same_model = model_spec(stored) == dict(spec)
    except ValueError:  # an unsupported dtype
        same_model = False
    if not same_model:
        raise CheckpointError("its tensors are not this run's model")
    # In the model's order: the aggregation flattens the weights in this order.
    weights = OrderedDict((name, stored[name]) for name in spec)
    velocity = document.get("velocity")
    if with_velocity:
        flat = flatten(weights)
        if (
            not isinstance(velocity, torch.Tensor)
            or velocity.shape != flat.shape
            or velocity.dtype != flat.dtype
        ):
            raise CheckpointError("the run uses server momentum: no velocity of the model's size")
    elif velocity is not None:
        raise CheckpointError("it holds a server velocity but the run has no server momentum")
    return Checkpoint(rnd, weights, velocity)


def newest_trusted_checkpoint(
    directory: Path,
    *,
    summaries: Mapping[int, RoundSummary],
    spec: ModelSpec,
    with_velocity: bool,
    warn: Callable[[str], None],
) -> Checkpoint | None:
    """The newest checkpoint in ``directory`` whose model digest the committed summaries hold.

    Every newer checkpoint file is skipped with a ``warn`` message saying why;
    None when no checkpoint qualifies (the caller recomputes from round 1).
    """
    last = max(summaries, default=0)
    candidates = []
    for path in Path(directory).glob("round-*.pt"):
        named = CHECKPOINT_NAME.fullmatch(path.name)
        if named is None:
            warn(f"checkpoint {path.name} ignored: not named round-NNNN.pt")
        else:
            candidates.append((int(named.group(1)), path))
    for rnd, path in sorted(candidates, reverse=True):
        summary = summaries.get(rnd)
        if summary is None:
            warn(
                f"checkpoint {path.name} ignored: round {rnd} has no committed summary "
                f"(the last committed summary is round {last})"
            )
            continue
        try:
            checkpoint = read_checkpoint(path, spec=spec, with_velocity=with_velocity)
        except CheckpointError as exc:
            warn(f"checkpoint {path.name} ignored: {exc}")
            continue
        if weights_digest(checkpoint.weights) != summary.model_digest:
            warn(
                f"checkpoint {path.name} ignored: its model digest is not the one committed "
                f"for round {rnd} (altered, or from another run)"
            )
            continue
        return checkpoint
    return None
