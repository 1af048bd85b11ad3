"""The simulator wiring: select -> train (DP) -> validate -> reputation -> aggregate."""

import itertools
from collections import OrderedDict
from typing import Any

import pytest
import torch

from chain.simulator import run_simulation, simulate_rounds
from fl.attacks import ATTACKS
from fl.config import RunConfig
from fl.datasets import load_splits
from fl.privacy import BUDGET_RTOL
from fl.rounds import ClientUpdate, Federation, validation_params
from fl.validation import update_norm

# The registered synthetic dataset, selected by name like any other.
BASE = dict(
    dataset="synthetic",
    clients=10,
    frac=1.0,
    train_size=2_000,
    val_size=200,
    test_size=200,
    model="mlp",
    lr=0.1,
    batch_size=10,
    seed=3,
)
SPLITS = load_splits(RunConfig(**BASE))


def run(**overrides):
    counter = itertools.count()
    return run_simulation(RunConfig(**{**BASE, **overrides}), SPLITS, clock=lambda: next(counter))


@pytest.mark.parametrize("attack", ATTACKS)
def test_every_attack_is_rejected_and_then_excluded(attack):
    # Prepare / Execute: 3 of 10 clients attack; everyone is selected in round 1
    doc = run(rounds=2, malicious=0.3, attack=attack)
    bad = set(doc["config"]["malicious_clients"])
    first, second = doc["rounds"]
    # Assert: round 1 rejects (or records as silent) exactly the attackers
    caught = set(first["rejected"]) | set(first["silent"])
    assert len(bad) == 3
    assert caught == bad
    assert set(first["accepted"]) == set(first["selected"]) - bad
    # ... and round 2 no longer selects them (reputation below the threshold)
    assert not bad & set(second["selected"])
    assert all(first["reputation"][c] < 0.4 for c in bad)


def test_without_validation_attackers_are_accepted():
    doc = run(rounds=1, malicious=0.3, attack="labelflip", validation=False, reputation=False)
    assert set(doc["config"]["malicious_clients"]) <= set(doc["rounds"][0]["accepted"])


def _without_seconds(doc):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in doc["rounds"]]


def test_runs_with_reproducible_noise_are_deterministic_for_a_seed():
    # Execute
    a, b = (run(rounds=2, dp="gaussian", epsilon=5.0, reproducible_noise=True) for _ in range(2))
    # Assert
    assert _without_seconds(a) == _without_seconds(b)
    assert a["privacy"]["noise"] == "reproducible (NO PRIVACY)"


def test_runs_with_secret_noise_differ_but_without_dp_do_not():
    # Execute
    a, b = (run(rounds=1, dp="gaussian", epsilon=5.0) for _ in range(2))
    c, d = (run(rounds=1) for _ in range(2))
    # Assert: the same selection, other losses (the noise is fresh each run)
    assert a["privacy"]["noise"] == "secret"
    assert a["rounds"][0]["selected"] == b["rounds"][0]["selected"]
    assert a["rounds"][0]["loss"] != b["rounds"][0]["loss"]
    assert _without_seconds(c) == _without_seconds(d)


def test_clients_decline_when_their_budget_is_spent():
    # Prepare: budget for exactly one participation
    config = RunConfig(
        **{**BASE, "rounds": 2, "dp": "gaussian", "epsilon": 2.0, "dp_participations": 1}
    )
    counter = itertools.count()
    # Execute
    first, second = list(simulate_rounds(config, SPLITS, clock=lambda: next(counter)))
    # Assert
    assert len(first.selected) == 10 and first.extra["declined"] == []
    assert 1.9 <= first.epsilon_spent_max <= 2.0
    assert second.selected == [] and len(second.extra["declined"]) == 10
    assert second.epsilon_spent_max == first.epsilon_spent_max


@pytest.mark.parametrize("dp", ["gaussian", "laplace"])
def test_spent_epsilon_never_exceeds_the_budget(dp):
    doc = run(rounds=4, frac=0.5, dp=dp, epsilon=3.0, dp_participations=2)
    spent = [r["epsilon_spent_max"] for r in doc["rounds"]]
    assert max(spent) <= 3.0 * (1 + BUDGET_RTOL)  # the accountant's rounding slack
    assert spent == sorted(spent)


def test_paper_selection_picks_top_self_assessment_first_round():
    # A liar claims the largest, cleanest, most complete data set, so top-N picks it.
    doc = run(rounds=1, frac=0.2, malicious=0.1, attack="lie", selection="paper")
    liar = doc["config"]["malicious_clients"][0]
    assert liar in doc["rounds"][0]["selected"]


def test_federation_subset_holds_the_same_states_for_hosted_clients():
    config = RunConfig(**{**BASE, "malicious": 0.3, "attack": "noise"})
    full = Federation.create(config, SPLITS.train)
    hosted = ["client-001", "client-007"]
    part = Federation.create(config, SPLITS.train, only=hosted)
    assert part.ids == hosted
    assert part.malicious == full.malicious  # the draw covers every client
    for cid in hosted:
        a, b = full.client(cid), part.client(cid)
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
        assert (a.summary, a.attack, a.plan) == (b.summary, b.attack, b.plan)


def test_reference_direction_test_is_switched_on_by_the_run_config():
    # Prepare: label flipping under Gaussian DP, full-batch clients.
    dp_run = dict(
        rounds=1, malicious=0.3, attack="labelflip", dp="gaussian", batch_size=200, lr=2.0
    )
    # Execute
    on = run(**dp_run, momentum=0.0, dropout=False, val_reference_cosine=True)
    off = run(**dp_run, momentum=0.0, dropout=False)
    # Assert: the attackers are rejected for their direction only when asked,
    # and the test clips the reference at the clients' bound.
    bad = on["config"]["malicious_clients"]
    assert all("validation set's clipped descent" in on["rounds"][0]["rejected"][c] for c in bad)
    assert not any("clipped descent" in r for r in off["rounds"][0]["rejected"].values())
    params = validation_params(RunConfig(clip=0.5, val_reference_cosine=True))
    assert (params.reference_cosine, params.reference_clip) == (True, 0.5)


def copying_federation(
    config: RunConfig, copier: str, *, noise: float = 0.0
) -> tuple[Federation, dict[tuple[int, str], ClientUpdate]]:
    """A federation where ``copier`` trains in round 1 only; from round 2 it sends the
    round-before update of the first other client that sent one (plus ``noise`` times
    its norm), re-signed as its own. Also every update sent, by (round, client)."""
    federation = Federation.create(config, SPLITS.train)
    sent: dict[tuple[int, str], ClientUpdate] = {}
    for cid, state in federation.clients.items():
        state.participate = recording(state.participate, cid, sent)  # type: ignore[method-assign]
    honest = federation.clients[copier].participate

    def copy(model: Any, weights: Any, *, round: int, config: RunConfig) -> ClientUpdate | None:
        if round == 1:
            return honest(model, weights, round=round, config=config)
        victim = min(c for r, c in sent if r == round - 1 and c != copier)
        delta = sent[(round - 1, victim)].delta
        g = torch.Generator().manual_seed(round)
        jitter = OrderedDict((k, torch.randn(v.shape, generator=g)) for k, v in delta.items())
        scale = noise * update_norm(delta) / update_norm(jitter)
        copied = OrderedDict((k, v + scale * jitter[k]) for k, v in delta.items())
        released = federation.clients[copier].released_records
        return ClientUpdate(copier, round, copied, released, 0.0)

    federation.clients[copier].participate = copy  # type: ignore[method-assign]
    return federation, sent


def recording(participate: Any, cid: str, sent: dict) -> Any:
    def run(model: Any, weights: Any, *, round: int, config: RunConfig) -> ClientUpdate | None:
        update = participate(model, weights, round=round, config=config)
        if update is not None:
            sent[(round, cid)] = update
        return update

    return run


@pytest.mark.parametrize(
    ("noise", "reason"), [(0.0, "copy: the digest of"), (0.01, "copy: within")]
)
def test_a_client_copying_an_earlier_update_is_rejected_and_its_reputation_falls(noise, reason):
    # Prepare: every client is selected; client-004 copies from round 2 on.
    # Under DP a copy of the round before passes every other check (the tree
    # before the copy check accepted it in every round, its reputation rising).
    config = RunConfig(
        **{**BASE, "rounds": 4, "dp": "gaussian", "epsilon": 10.0, "reproducible_noise": True}
    )
    federation, _sent = copying_federation(config, "client-004", noise=noise)
    counter = itertools.count()
    # Execute
    rounds = list(
        simulate_rounds(config, SPLITS, clock=lambda: next(counter), federation=federation)
    )
    # Assert: accepted while it trained; each copy is rejected as one, the
    # original is not; two rejections cost it the reputation to be selected
    first, second, third, fourth = rounds
    assert "client-004" in first.accepted
    for rnd, record in ((2, second), (3, third)):
        assert record.rejected["client-004"].startswith(reason)
        assert f"client-000's round-{rnd - 1} update" in record.rejected["client-004"]
        assert "client-000" in record.accepted
    reputation = [r.extra["reputation"]["client-004"] for r in (first, second, third)]
    assert reputation == sorted(reputation, reverse=True)
    assert reputation[0] > 0.5 > 0.4 > reputation[2]
    assert "client-004" not in fourth.selected


def test_honest_runs_record_no_copy():
    # Execute: a few rounds without and with DP, every client in every round
    docs = [run(rounds=3), run(rounds=3, dp="gaussian", epsilon=10.0, reproducible_noise=True)]
    # Assert
    for doc in docs:
        for r in doc["rounds"]:
            assert not any(v.startswith("copy:") for v in r["rejected"].values())
