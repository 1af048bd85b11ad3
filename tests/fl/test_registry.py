"""The name -> implementation registries (fl.registry) and the tables built on them."""

import pytest

from fl.aggregation import AGGREGATION_REGISTRY, AGGREGATIONS
from fl.attacks import ATTACK_REGISTRY, ATTACKS
from fl.config import RunConfig
from fl.datasets import DATASET_REGISTRY, DATASETS
from fl.models import MODEL_NAMES, MODEL_REGISTRY
from fl.partition import DISTRIBUTION_REGISTRY, DISTRIBUTIONS
from fl.privacy import MECHANISM_REGISTRY, MECHANISMS, mechanism_of
from fl.registry import Registry
from fl.validation import RULE_REGISTRY, RULES


def test_register_files_the_object_and_returns_it_unchanged():
    registry: Registry[object] = Registry("widget")

    @registry.register("a")
    def a() -> None: ...

    assert registry.get("a") is a
    assert "a" in registry and "b" not in registry and 3 not in registry


def test_names_keep_registration_order():
    registry: Registry[int] = Registry("number")
    for name, value in (("zeta", 1), ("alpha", 2), ("mid", 3)):
        registry.register(name)(value)
    assert registry.names() == ("zeta", "alpha", "mid")
    assert list(registry) == ["zeta", "alpha", "mid"] and len(registry) == 3


def test_unknown_name_is_a_clear_error_listing_the_choices():
    registry: Registry[int] = Registry("widget")
    registry.register("one")(1)
    registry.register("two")(2)
    with pytest.raises(ValueError, match=r"^unknown widget 'three' \(choices: one, two\)$"):
        registry.get("three")
    with pytest.raises(ValueError, match="unknown widget"):
        registry.get(None)  # type: ignore[arg-type]


def test_duplicate_registration_is_refused_and_keeps_the_first():
    registry: Registry[int] = Registry("widget")
    registry.register("one")(1)
    with pytest.raises(ValueError, match="widget 'one' is already registered"):
        registry.register("one")(2)
    assert registry.get("one") == 1


def test_empty_name_is_refused():
    with pytest.raises(ValueError, match="non-empty string"):
        Registry("widget").register("")


@pytest.mark.parametrize(
    ("names", "registry"),
    [
        (AGGREGATIONS, AGGREGATION_REGISTRY),
        (ATTACKS, ATTACK_REGISTRY),
        (DATASETS, DATASET_REGISTRY),
        (DISTRIBUTIONS, DISTRIBUTION_REGISTRY),
        (MECHANISMS, MECHANISM_REGISTRY),
        (MODEL_NAMES, MODEL_REGISTRY),
        (RULES, RULE_REGISTRY),
    ],
)
def test_the_choice_tuples_are_the_registries_names(names, registry):
    assert isinstance(names, tuple)
    assert names == registry.names()


def test_the_existing_choices_keep_their_names_and_order():
    assert AGGREGATIONS[:4] == ("fedavg", "median", "trimmed-mean", "krum")
    assert ATTACKS[:6] == ("labelflip", "noise", "scale", "nan", "silent", "lie")
    assert MECHANISMS == ("none", "gaussian", "laplace")
    assert RULES[:2] == ("relative", "absolute")
    assert MODEL_NAMES[:3] == ("cnn", "cnn-large", "mlp")
    assert DISTRIBUTIONS[:3] == ("iid", "noniid", "dirichlet")
    assert DATASETS[:2] == ("mnist", "synthetic")


def test_config_checks_the_dataset_against_the_registry():
    with pytest.raises(ValueError, match=r"unknown dataset 'cifar' \(choices: mnist, synthetic"):
        RunConfig(dataset="cifar")
    assert RunConfig(dataset="synthetic").dataset == "synthetic"


@pytest.mark.parametrize(
    ("name", "none", "delta", "norm", "accountants"),
    [
        ("none", True, 0.0, "l2", ()),
        ("gaussian", False, 1e-5, "l2", ("rdp", "prv")),
        ("laplace", False, 0.0, "l1", ("basic",)),
    ],
)
def test_each_mechanism_states_what_differs(name, none, delta, norm, accountants):
    mechanism = mechanism_of(name)
    assert mechanism.name == name
    assert mechanism.is_none is none
    assert mechanism.delta(1e-5) == delta
    assert mechanism.clip_norm == norm
    assert mechanism.accountants == accountants
    assert mechanism_of(RunConfig(dp=name)).name == name


def test_unknown_mechanism_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown DP mechanism 'exponential' \(choices: none"):
        mechanism_of("exponential")
