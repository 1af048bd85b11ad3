"""The server's step: FedAvgM velocity and the --server-lr-decay schedule."""

import itertools
import math
from collections import OrderedDict

import pytest
import torch

from fl.config import RunConfig
from fl.rounds import COSINE_FINAL_FRACTION, ClientUpdate, aggregate_round, server_step_size


def cfg(**overrides):
    return RunConfig(**{"rounds": 11, "train_size": 1_000, **overrides})


def update(cid, value, n=1):
    delta = OrderedDict(w=torch.full((2,), float(value)))
    return ClientUpdate(cid, 1, delta, n, 0.0)


def test_constant_schedule_is_the_server_lr_every_round():
    c = cfg(server_lr=0.3)
    assert [server_step_size(c, r) for r in (1, 6, 11)] == [0.3, 0.3, 0.3]


def test_cosine_schedule_endpoints_midpoint_and_monotone():
    c = cfg(server_lr=2.0, server_lr_decay="cosine")
    steps = [server_step_size(c, r) for r in range(1, 12)]
    assert steps[0] == pytest.approx(2.0)
    assert steps[-1] == pytest.approx(2.0 * COSINE_FINAL_FRACTION)
    # Halfway (round 6 of 11): the mean of the two ends.
    assert steps[5] == pytest.approx(2.0 * (1 + COSINE_FINAL_FRACTION) / 2)
    assert all(a > b for a, b in itertools.pairwise(steps))
    # Hand-computed round 3: progress 0.2.
    expected = 2.0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.2)))
    assert steps[2] == pytest.approx(expected)


def test_single_round_run_uses_the_full_step():
    assert server_step_size(cfg(rounds=1, server_lr_decay="cosine", server_lr=0.5), 1) == 0.5


def test_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="--server-lr-decay"):
        cfg(server_lr_decay="linear")


def test_aggregate_round_applies_momentum_and_the_scheduled_step():
    c = cfg(server_momentum=0.5, server_lr=1.0, server_lr_decay="cosine")
    w0 = OrderedDict(w=torch.zeros(2))
    # Round 1: the sample-weighted mean of 1 (n=1) and 4 (n=2) is 3; step 1.0.
    w1, v1 = aggregate_round(c, w0, [update("b", 4, 2), update("a", 1, 1)], rnd=1)
    assert torch.allclose(w1["w"], torch.full((2,), 3.0))
    assert torch.allclose(v1, torch.full((2,), 3.0))
    # Last round: velocity 0.5 * 3 + 1 = 2.5, times the final step 0.1.
    w2, v2 = aggregate_round(c, w1, [update("a", 1)], rnd=11, velocity=v1)
    assert torch.allclose(v2, torch.full((2,), 2.5))
    assert torch.allclose(w2["w"], torch.full((2,), 3.0 + 0.25))


def test_round_without_updates_keeps_the_weights_without_momentum():
    w0 = OrderedDict(w=torch.ones(2))
    w1, v = aggregate_round(cfg(), w0, [], rnd=3)
    assert torch.equal(w1["w"], w0["w"]) and v is None


def test_aggregate_round_bounds_an_inflated_weight_by_twice_the_median():
    # Prepare: three honest updates of 1.0 (100 records each) and a zero update claiming 10^6
    c = cfg(max_records=10**6)
    honest = [update(f"c{i}", 1.0, n=100) for i in range(3)]
    inflated = update("c9", 0.0, n=10**6)
    # Execute
    weights, _ = aggregate_round(c, OrderedDict(w=torch.zeros(2)), [*honest, inflated], rnd=1)
    # Assert: the zero update weighs 200 (twice the median), not 10^6
    assert weights["w"].tolist() == pytest.approx([300 / 500] * 2)
