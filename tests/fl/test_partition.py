import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fl.partition import partition, summarize


def labels_sorted_blocks(n_per_class: int = 60) -> np.ndarray:
    return np.repeat(np.arange(10), n_per_class)


def assert_disjoint_and_complete(parts: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(parts)
    assert len(np.unique(joined)) == len(joined)
    assert sorted(joined.tolist()) == list(range(n))


@pytest.mark.parametrize("dist", ["iid", "noniid", "dirichlet"])
def test_partitions_are_disjoint_and_complete(dist):
    labels = labels_sorted_blocks()
    parts = partition(dist=dist, labels=labels, num_clients=10, rng=np.random.default_rng(1))
    assert_disjoint_and_complete(parts, len(labels))


@pytest.mark.parametrize("dist", ["iid", "noniid", "dirichlet"])
def test_partitions_are_deterministic_for_a_seed(dist):
    labels = labels_sorted_blocks()
    a = partition(dist=dist, labels=labels, num_clients=10, rng=np.random.default_rng(7))
    b = partition(dist=dist, labels=labels, num_clients=10, rng=np.random.default_rng(7))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_iid_shards_are_equal_sized():
    parts = partition(
        dist="iid", labels=labels_sorted_blocks(), num_clients=10, rng=np.random.default_rng(0)
    )
    assert [len(p) for p in parts] == [60] * 10


def test_noniid_gives_each_client_two_label_shards_pinned():
    # Prepare: 600 samples, 10 clients -> 20 shards of 30, each inside one class.
    labels = labels_sorted_blocks()
    # Execute
    parts = partition(dist="noniid", labels=labels, num_clients=10, rng=np.random.default_rng(0))
    # Assert: pinned class sets for seed 0
    classes = [summarize(labels[p]).classes_present for p in parts]
    assert classes == [
        (2, 9),
        (1, 3),
        (6, 8),
        (1, 5),
        (4, 5),
        (0, 6),
        (2, 3),
        (8, 9),
        (4, 7),
        (0, 7),
    ]
    assert all(len(p) == 60 for p in parts)


def test_dirichlet_small_alpha_is_skewed_pinned():
    labels = labels_sorted_blocks(100)
    parts = partition(
        dist="dirichlet", labels=labels, num_clients=5, rng=np.random.default_rng(3), alpha=0.1
    )
    counts = [np.bincount(labels[p], minlength=10).tolist() for p in parts]
    assert counts == [
        [99, 0, 85, 0, 23, 7, 91, 7, 12, 0],
        [0, 0, 0, 0, 0, 4, 3, 86, 0, 8],
        [0, 0, 0, 0, 0, 0, 0, 0, 2, 90],
        [0, 100, 12, 99, 76, 71, 0, 6, 81, 0],
        [1, 0, 3, 1, 1, 18, 6, 1, 5, 2],
    ]


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 40), st.integers(0, 2**32 - 1))
def test_iid_is_complete_for_any_client_count(k, seed):
    labels = labels_sorted_blocks(8)
    parts = partition(dist="iid", labels=labels, num_clients=k, rng=np.random.default_rng(seed))
    assert len(parts) == k
    assert_disjoint_and_complete(parts, len(labels))


def test_unknown_distribution_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown distribution 'zipf'"):
        partition(
            dist="zipf", labels=labels_sorted_blocks(), num_clients=2, rng=np.random.default_rng(0)
        )  # type: ignore[arg-type]


def test_summary_lists_classes_and_count():
    s = summarize(np.array([3, 3, 7, 1]))
    assert (s.n_samples, s.classes_present) == (4, (1, 3, 7))
