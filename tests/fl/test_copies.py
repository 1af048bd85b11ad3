"""The copy check (fl.copies): exact and near copies of earlier and same-round updates."""

from __future__ import annotations

import hashlib
import itertools
import math
from collections import OrderedDict

import pytest
import torch

from fl.config import RunConfig
from fl.copies import (
    COPY_TOLERANCE,
    RoundHistory,
    SeenUpdate,
    copied_updates,
    copy_residual,
)
from fl.datasets import load_splits
from fl.models import build_model, model_for
from fl.rounds import Federation, aggregate_round
from fl.seeds import torch_generator
from fl.validation import ValidationParams, validate_updates
from fl.weights import flat_by_name, get_weights

BASE = b"\x01" * 32  # this round's global model
OLD_BASE = b"\x00" * 32  # the previous round's


def update(seed: int, *, size: int = 50) -> OrderedDict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return OrderedDict(w=torch.randn(size, generator=g), b=torch.randn(3, generator=g))


def digest_of(delta: OrderedDict[str, torch.Tensor]) -> bytes:
    """A stand-in for the canonical digest (chain.digests): equal bytes, equal digest."""
    return hashlib.sha256(flat_by_name(delta).numpy().tobytes()).digest()


def history(
    now: dict[str, OrderedDict[str, torch.Tensor]], *seen: SeenUpdate, base: bytes = BASE
) -> RoundHistory:
    return RoundHistory(base, {c: digest_of(d) for c, d in now.items()}, seen)


def seen(client: str, delta: OrderedDict[str, torch.Tensor], *, tensors: bool = True, **kw):
    return SeenUpdate(
        client,
        kw.get("round", 1),
        digest_of(delta),
        kw.get("base", OLD_BASE),
        delta if tensors else None,
    )


def noisy(delta: OrderedDict[str, torch.Tensor], relative: float, seed: int = 99):
    """``delta`` plus noise of ``relative`` times its norm."""
    g = torch.Generator().manual_seed(seed)
    noise = OrderedDict((k, torch.randn(v.shape, generator=g)) for k, v in delta.items())
    scale = relative * float(flat_by_name(delta).norm()) / float(flat_by_name(noise).norm())
    return OrderedDict((k, v + scale * noise[k]) for k, v in delta.items())


def test_residual_is_the_sine_of_the_angle_and_blind_to_scale():
    # Prepare
    u = torch.tensor([1.0, 0.0], dtype=torch.float64)
    v = torch.tensor([1.0, 1.0], dtype=torch.float64)
    # Execute, Assert
    assert copy_residual(u, v) == pytest.approx(math.sqrt(0.5))
    assert copy_residual(v, u) == pytest.approx(math.sqrt(0.5))
    assert copy_residual(u, 0.001 * u) == 0.0
    assert copy_residual(u, -u) == 1.0  # opposite: as far as it gets
    assert copy_residual(u, torch.zeros(2, dtype=torch.float64)) == 1.0  # no direction


def test_exact_copy_of_an_earlier_update_of_another_client_is_rejected():
    # Prepare: client-002 sends client-001's round-1 update as its own
    original = update(1)
    now = {"client-002": original.copy(), "client-003": update(3)}
    # Execute
    reasons = copied_updates(now, history(now, seen("client-001", original, tensors=False)))
    # Assert: found from the digest alone (no tensors needed)
    assert list(reasons) == ["client-002"]
    assert reasons["client-002"].startswith("copy: the digest of client-001's round-1 update")


def test_own_earlier_update_counts_as_a_copy_unless_from_the_same_model():
    # Prepare: client-001 sends its round-1 update again
    original = update(1)
    now = {"client-001": original}
    # Execute
    from_old_model = copied_updates(now, history(now, seen("client-001", original)))
    from_same_model = copied_updates(now, history(now, seen("client-001", original, base=BASE)))
    # Assert: a stale replay is a copy; retraining the same model may honestly repeat
    assert "client-001" in from_old_model
    assert from_same_model == {}


def test_exact_copies_within_a_round_are_all_rejected():
    # Prepare: two clients send one update; nothing says which trained it
    shared = update(1)
    now = {"client-001": shared, "client-002": shared.copy(), "client-003": update(3)}
    # Execute
    reasons = copied_updates(now, history(now))
    # Assert
    assert sorted(reasons) == ["client-001", "client-002"]
    assert reasons["client-001"] == "copy: the same update as client-002 in this round"
    assert reasons["client-002"] == "copy: the same update as client-001 in this round"


@pytest.mark.parametrize(
    "disguise",
    [
        lambda d: noisy(d, 0.02),  # a little noise
        lambda d: OrderedDict((k, 0.5 * v) for k, v in d.items()),  # scaled
        lambda d: noisy(OrderedDict((k, 3.0 * v) for k, v in d.items()), 0.04),  # both
    ],
)
def test_near_copy_of_an_earlier_accepted_update_is_rejected(disguise):
    # Prepare
    original = update(1)
    now = {"client-002": disguise(original), "client-003": update(3)}
    # Execute
    reasons = copied_updates(now, history(now, seen("client-001", original)))
    # Assert
    assert list(reasons) == ["client-002"]
    assert reasons["client-002"].startswith("copy: within ")
    assert "of client-001's round-1 update (copy tolerance 0.05)" in reasons["client-002"]


def test_near_copies_within_a_round_are_all_rejected():
    # Prepare
    shared = update(1)
    now = {"client-001": shared, "client-002": noisy(shared, 0.01), "client-003": update(3)}
    # Execute
    reasons = copied_updates(now, history(now))
    # Assert
    assert sorted(reasons) == ["client-001", "client-002"]
    assert "of client-002's update" in reasons["client-001"]


def test_more_noise_than_the_tolerance_is_not_a_copy():
    # Prepare: noise at 20% of the norm: a residual of about 0.2
    original = update(1, size=2_000)
    now = {"client-002": noisy(original, 0.2)}
    # Execute
    reasons = copied_updates(now, history(now, seen("client-001", original)))
    # Assert
    assert reasons == {}


def test_updates_outside_the_window_are_compared_by_digest_only():
    # Prepare: the earlier update's tensors are not part of the history
    original = update(1)
    now = {"client-002": noisy(original, 0.01)}
    # Execute
    reasons = copied_updates(now, history(now, seen("client-001", original, tensors=False)))
    # Assert
    assert reasons == {}


def test_validation_rejects_a_copy_with_its_reason_and_malformed_first():
    # Prepare: a copy, a NaN update with the same digest as nothing, an honest update
    model = build_model("mlp", generator=torch.Generator().manual_seed(0))
    weights = get_weights(model)
    g = torch.Generator().manual_seed(5)
    honest = OrderedDict((k, 0.01 * torch.randn(v.shape, generator=g)) for k, v in weights.items())
    other = OrderedDict((k, 0.01 * torch.randn(v.shape, generator=g)) for k, v in weights.items())
    bad = OrderedDict((k, torch.full_like(v, float("nan"))) for k, v in weights.items())
    now = {"client-001": honest, "client-002": honest.copy(), "client-003": other}
    now_and_bad = {**now, "client-004": bad}
    x = torch.randn(20, 1, 28, 28, generator=g)
    # Execute
    verdicts = validate_updates(
        model=model,
        global_weights=weights,
        updates=list(now_and_bad.items()),
        x_val=x,
        y_val=torch.arange(20) % 10,
        params=ValidationParams(),
        history=history(now_and_bad),
    )
    # Assert
    assert not verdicts["client-001"].accepted and not verdicts["client-002"].accepted
    assert verdicts["client-002"].reason == "copy: the same update as client-001 in this round"
    assert verdicts["client-004"].reason.startswith("malformed:")
    assert verdicts["client-003"].reason.startswith("validation accuracy")


HONEST = dict(
    dataset="synthetic",
    clients=6,
    frac=1.0,
    train_size=1_200,
    val_size=100,
    test_size=100,
    model="mlp",
    batch_size=10,
    seed=4,
)


def deltas(updates):
    return {c: u.delta for c, u in updates.items()}


@pytest.mark.parametrize("dp", ["none", "gaussian"])
def test_honest_updates_are_far_from_each_other_and_from_the_last_round(dp):
    # Prepare: every client trains in round 1, and again from the aggregate in round 2
    config = RunConfig(**HONEST, dp=dp, epsilon=10.0, reproducible_noise=True)
    federation = Federation.create(config, load_splits(config).train)
    model = model_for(config, generator=torch_generator(config.seed, "init"))
    weights = get_weights(model)
    first = {
        c: s.participate(model, weights, round=1, config=config)
        for c, s in federation.clients.items()
    }
    after, _ = aggregate_round(config, weights, list(first.values()), rnd=1)
    second = {
        c: s.participate(model, after, round=2, config=config)
        for c, s in federation.clients.items()
    }
    earlier = [seen(c, u.delta) for c, u in first.items()]
    # Execute
    round_one = copied_updates(deltas(first), history(deltas(first)))
    round_two = copied_updates(deltas(second), history(deltas(second), *earlier))
    # Assert: nothing flagged, and the closest pair is far above the tolerance
    assert round_one == {} and round_two == {}
    pairs = [
        *itertools.combinations(first.values(), 2),
        *itertools.combinations(second.values(), 2),
        *itertools.product(second.values(), first.values()),
    ]
    closest = min(copy_residual(flat_by_name(u.delta), flat_by_name(v.delta)) for u, v in pairs)
    assert closest > 4 * COPY_TOLERANCE
