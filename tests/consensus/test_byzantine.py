"""Each Byzantine behaviour, alone within the f bound, breaks neither safety nor liveness.

Scenarios run in the deterministic simulator with no random network faults,
so each test isolates one behaviour (Castro & Liskov's fault model: up to f
arbitrary replicas out of n = 3f+1).
"""

from __future__ import annotations

import pytest

from consensus.ledger import decode_batch
from consensus.sim import INVALID_OPERATION, Simulation


def _run(n: int, assign: dict[int, str], *, seed: int = 5, blocks: int = 40) -> Simulation:
    sim = Simulation(n=n, seed=seed, blocks=blocks, faults=False, assign=assign)
    result = sim.run()
    assert result.violations == []
    assert result.liveness_failure is None
    assert result.blocks_committed >= blocks
    return sim


def _honest_views(sim: Simulation) -> list[int]:
    return [inst.replica.view for inst in sim.instances[: sim.n] if inst.honest]  # type: ignore[union-attr]


def test_equivocating_primary_cannot_split_honest_replicas() -> None:
    sim = _run(4, {0: "equivocate"})
    assert len(sim.checker.committed) >= 40


def test_double_votes_are_counted_once() -> None:
    _run(4, {1: "double_vote"})


def test_votes_signed_by_another_key_are_ignored() -> None:
    _run(4, {2: "wrong_signer"})


def test_replayed_old_view_and_cross_phase_messages_are_ignored() -> None:
    _run(4, {1: "replay"}, blocks=60)


def test_forged_view_change_proofs_are_rejected() -> None:
    sim = _run(4, {3: "forge_view_change"})
    # The forgeries never gathered f+1 support, so honest replicas stayed in view 0.
    assert _honest_views(sim) == [0, 0, 0]


def test_new_view_with_wrong_reissue_set_leads_to_next_view() -> None:
    # 0 withholds (forcing a view change) and 1, primary of view 1, lies in NEW-VIEW.
    sim = _run(7, {0: "withhold", 1: "bad_new_view"})
    assert min(_honest_views(sim)) >= 2


def test_invalid_proposal_is_never_committed() -> None:
    sim = _run(4, {0: "invalid_proposal"})
    store = sim.instances[1].store
    payloads = [block.payload for block in store.read_range(1, store.height() + 1)]
    assert all(
        request.operation != INVALID_OPERATION for p in payloads for request in decode_batch(p)
    )
    assert min(_honest_views(sim)) >= 1


def test_withheld_messages_only_cost_a_view_change() -> None:
    sim = _run(4, {0: "withhold"})
    assert min(_honest_views(sim)) >= 1


def test_twins_sharing_one_key_cannot_fork_the_chain() -> None:
    _run(4, {0: "twins"})


@pytest.mark.parametrize("seed", range(6))
def test_twins_of_a_backup_under_random_seeds(seed: int) -> None:
    _run(4, {2: "twins"}, seed=seed)
