import pytest
import torch

from fl.aggregation import (
    aggregate,
    coordinate_median,
    fedavg,
    fedavg_weights,
    krum,
    trimmed_mean,
)

U = torch.tensor([[1.0, 10.0], [2.0, 20.0], [4.0, -40.0]])


def test_fedavg_weights_by_sample_count():
    # (1*1 + 2*1 + 4*2) / 4 = 2.75 ; (10 + 20 - 80) / 4 = -12.5
    assert fedavg(U, [1, 1, 2]).tolist() == [2.75, -12.5]


def test_fedavg_rejects_bad_weights():
    with pytest.raises(ValueError, match="one non-negative weight per update"):
        fedavg(U, [1, 1])
    with pytest.raises(ValueError):
        fedavg(U, [0, 0, 0])


def test_median_odd_count():
    assert coordinate_median(U).tolist() == [2.0, 10.0]


def test_median_even_count_averages_middle_values():
    u = torch.tensor([[1.0], [3.0], [10.0], [100.0]])
    assert coordinate_median(u).tolist() == [6.5]


def test_trimmed_mean_drops_extremes():
    u = torch.tensor([[-100.0], [1.0], [2.0], [3.0], [4.0], [5.0], [6.0], [7.0], [8.0], [1000.0]])
    # beta=0.1 of 10 drops one from each end: mean(1..8) = 4.5
    assert trimmed_mean(u, beta=0.1).tolist() == [4.5]


def test_trimmed_mean_rejects_bad_fraction():
    with pytest.raises(ValueError, match=r"\[0, 0.5\)"):
        trimmed_mean(U, beta=0.5)


def test_krum_picks_the_update_closest_to_its_neighbours():
    # Four clustered updates and one far outlier; f=1 scores over n-f-2 = 2 neighbours.
    u = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [50.0, 50.0], [0.5, 0.5]])
    assert krum(u, f=1).tolist() == [0.5, 0.5]


def test_multi_krum_averages_best_m():
    u = torch.tensor([[0.0], [0.1], [0.2], [9.0], [10.0]])
    # f=1 -> 2 neighbours. Scores: 0.05, 0.02, 0.05, ... ; best two are 0.1 then 0.0 (stable)
    assert krum(u, f=1, m=2).tolist() == pytest.approx([0.05])


def test_krum_needs_enough_updates():
    with pytest.raises(ValueError, match="at least 5 updates"):
        krum(U, f=1)


def test_aggregate_dispatches_and_rejects_unknown():
    assert aggregate("median", U, weights=[1, 1, 1]).tolist() == [2.0, 10.0]
    with pytest.raises(ValueError, match="unknown aggregation 'mean'"):
        aggregate("mean", U, weights=[1, 1, 1])


def test_fedavg_weights_keep_honest_counts_as_they_are():
    counts = [600, 587, 614, 1100]  # noisy releases; the largest under twice the median
    assert fedavg_weights(counts, cap=2400) == counts


def test_one_client_claiming_far_more_weighs_at_most_twice_the_median():
    # One claims the cap among nine honest clients: 2400 -> 2 * 600
    counts = [600] * 9 + [2400]
    weights = fedavg_weights(counts, cap=2400)
    assert weights == [600] * 9 + [1200]
    assert weights[-1] / sum(weights) == pytest.approx(1200 / 6600)


def test_in_a_round_of_two_the_larger_claim_weighs_at_most_twice_the_smaller():
    assert fedavg_weights([600, 2400], cap=2400) == [600, 1200]


def test_fedavg_weights_never_exceed_the_cap():
    assert fedavg_weights([5000, 5000, 5000], cap=2400) == [2400, 2400, 2400]
    assert fedavg_weights([], cap=2400) == []
