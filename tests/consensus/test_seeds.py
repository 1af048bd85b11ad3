"""Random-fault seeds, regression seeds, and the proof that the checker can fail.

Every failing seed found by ``bench/consensus_soak.py`` is added to
REGRESSION_SEEDS with the replay command it printed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from consensus.sim import Simulation

# (replicas, seed, blocks): found by the soak before the fixes named here.
REGRESSION_SEEDS = [
    # A replica in a view change never fetched blocks from peers in a lower view.
    (4, 31, 100),
    (4, 43, 100),
    (4, 60, 100),
    (4, 87, 100),
    # A lost VIEW-CHANGE left replicas split across two views with a silent fifth.
    (4, 213, 200),
    (4, 308, 200),
    (4, 334, 200),
    (4, 573, 200),
]


@pytest.mark.parametrize("seed", range(100))
def test_random_faults_n4(seed: int) -> None:
    result = Simulation(n=4, seed=1000 + seed, blocks=60).run()
    assert result.ok, f"{result.violations or result.liveness_failure}; replay: {result.replay}"


@pytest.mark.parametrize("seed", range(10))
def test_random_faults_n7(seed: int) -> None:
    result = Simulation(n=7, seed=2000 + seed, blocks=30).run()
    assert result.ok, f"{result.violations or result.liveness_failure}; replay: {result.replay}"


@pytest.mark.parametrize(("replicas", "seed", "blocks"), REGRESSION_SEEDS)
def test_regression_seed(replicas: int, seed: int, blocks: int) -> None:
    result = Simulation(n=replicas, seed=seed, blocks=blocks).run()
    assert result.ok, f"{result.violations or result.liveness_failure}; replay: {result.replay}"


def test_sqlite_store_under_crash_restart(tmp_path: Path) -> None:
    sim = Simulation(n=4, seed=17, blocks=40, store_dir=tmp_path)
    sim.crash(2)
    while min(sim.honest_heights()[:2]) < 15:
        sim.step_tick()
    sim.restart(2)
    result = sim.run()
    assert result.ok and sim.instances[2].store.height() >= 40


def test_f_plus_one_byzantine_replicas_make_the_checker_fail() -> None:
    # Prepare / Execute: 2 colluders out of 4 (f = 1).
    results = [Simulation(n=4, seed=seed, blocks=40, byzantine=2).run() for seed in range(5)]
    # Assert: the checker caught a safety violation, so it is able to fail.
    assert any(any("agreement" in v for v in r.violations) for r in results)


def test_f_plus_one_byzantine_replicas_make_the_checker_fail_n7() -> None:
    results = [Simulation(n=7, seed=seed, blocks=40, byzantine=3).run() for seed in range(5)]
    assert any(r.violations for r in results)


def test_failing_seed_prints_a_replay_command() -> None:
    result = Simulation(n=4, seed=0, blocks=40, byzantine=2).run()
    assert result.replay == (
        "python bench/consensus_soak.py --replicas 4 --seed 0 --blocks 40 --byzantine 2"
    )
