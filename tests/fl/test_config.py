"""RunConfig: each option declared once, its checks generated from the declaration."""

from __future__ import annotations

import math
from dataclasses import fields

import pytest

from fl.config import (
    DATASETS,
    RunConfig,
    at_least,
    flag,
    one_of,
    positive,
    run_option,
    within,
)
from fl.datasets import DATASET_REGISTRY


@pytest.mark.parametrize(
    ("interval", "inside", "outside"),
    [
        ("(0, 1]", [1e-9, 0.5, 1], [0, 1.5, -1, math.nan]),
        ("[0, 1)", [0, 0.999], [1, -0.1, math.nan]),
        ("(0, 1)", [0.5], [0, 1, math.nan]),
        ("[0, 1]", [0, 1], [-0.1, 1.1, math.nan]),
    ],
)
def test_an_interval_check_follows_its_brackets(interval, inside, outside):
    check = within(interval)
    assert all(check.ok(v) for v in inside)
    assert not any(check.ok(v) for v in outside)
    assert check.problem("frac", 2) == f"--frac must be in {interval}, got 2"


def test_the_check_helpers_say_what_they_want():
    assert at_least(1).problem("clients", 0) == "--clients must be >= 1, got 0"
    assert positive().problem("lr", math.nan) == "--lr must be positive, got nan"
    assert positive().problem("lr", math.inf) is None
    assert positive(finite=True).problem("local_epochs", math.inf) is not None
    assert one_of(("a", "b")).problem("val_rule", "c") == "--val-rule must be one of a, b, got 'c'"


@pytest.mark.parametrize(
    "name", [f.name for f in fields(RunConfig) if run_option(f).choices and f.name != "dataset"]
)
def test_a_value_outside_the_declared_choices_is_refused_by_name(name):
    choices = run_option(next(f for f in fields(RunConfig) if f.name == name)).choices
    with pytest.raises(ValueError) as raised:
        RunConfig(**{name: "no-such"})
    assert str(raised.value) == f"{flag(name)} must be one of {', '.join(choices)}, got 'no-such'"


def test_the_datasets_are_the_registrys():
    with pytest.raises(ValueError, match=r"unknown dataset 'cifar' \(choices: mnist, synthetic"):
        RunConfig(dataset="cifar")
    assert DATASET_REGISTRY.names() == DATASETS and {"mnist", "synthetic"} <= set(DATASETS)
    assert run_option(fields(RunConfig)[0]).choices == DATASETS


def test_an_unset_optional_option_is_not_checked_but_a_set_one_is():
    assert RunConfig(dp_participations=None).dp_participations is None
    with pytest.raises(ValueError, match="--dp-participations must be >= 1, got 0"):
        RunConfig(dp_participations=0)


def test_several_problems_are_reported_together_in_field_order():
    with pytest.raises(ValueError) as raised:
        RunConfig(clients=0, rounds=0, dp_augmentations=2)
    assert str(raised.value) == (
        "--clients must be >= 1, got 0; --rounds must be >= 1, got 0; "
        "--dp-augmentations needs --dp gaussian or laplace (it shapes DP-SGD's gradients)"
    )


def test_the_cross_option_checks_stay():
    assert RunConfig(dp="none", epsilon=0).epsilon == 0  # epsilon matters only under DP
    with pytest.raises(ValueError, match="--epsilon must be a positive number, got 0"):
        RunConfig(dp="gaussian", epsilon=0)
    with pytest.raises(ValueError, match=r"--clients \(10\) exceeds the training samples \(5\)"):
        RunConfig(clients=10, train_size=5)
