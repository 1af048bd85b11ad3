"""Replica state machine: normal case, quorum counting, requests, timers, view change."""

from __future__ import annotations

from consensus.ledger import GENESIS_HASH, Block, Request, encode_batch
from consensus.messages import Commit, Forward, NewView, Prepare, PrePrepare, ViewChange
from consensus.replica import Replica
from consensus.sim import FakeKeyring, Simulation
from consensus.store import MemoryBlockStore

from .conftest import Cluster, request


def test_primary_turns_a_request_into_a_pre_prepare_broadcast() -> None:
    # Prepare
    keys = FakeKeyring(4, __import__("random").Random(1))
    primary = Replica(
        replica_id=0,
        n=4,
        sign=keys.signer(0),
        verify=keys.verify,
        validate=lambda block: True,
        chain=MemoryBlockStore(),
    )
    # Execute
    primary.propose(request(1))
    ready = primary.ready()
    primary.advance()
    # Assert
    [(destination, message)] = ready.messages
    assert destination is None and isinstance(message, PrePrepare)
    assert (message.view, message.height) == (0, 1)


def test_normal_case_commits_on_every_replica_n4(cluster4: Cluster) -> None:
    cluster4.submit(request(1))
    cluster4.deliver()
    assert cluster4.heights() == [1, 1, 1, 1]
    assert [len(executed) for executed in cluster4.executed] == [1, 1, 1, 1]


def test_normal_case_commits_on_every_replica_n7() -> None:
    cluster = Cluster(7)
    for number in range(1, 6):
        cluster.submit(request(number))
        cluster.deliver()
    assert cluster.heights() == [5] * 7


def test_committed_blocks_carry_a_valid_certificate(cluster4: Cluster) -> None:
    cluster4.submit(request(1))
    cluster4.deliver()
    block = cluster4.stores[2].head()
    assert block is not None and block.certificate is not None
    assert block.certificate.is_valid(verify=cluster4.keys.verify, n=4)


def test_simulated_normal_case_n4_and_n7_stay_in_view_zero() -> None:
    for n in (4, 7):
        sim = Simulation(n=n, seed=3, blocks=30, faults=False)
        result = sim.run()
        assert result.ok and result.blocks_committed >= 30
        assert all(inst.replica.view == 0 for inst in sim.instances)  # type: ignore[union-attr]


def test_no_block_is_proposed_without_requests(cluster4: Cluster) -> None:
    cluster4.tick(200)
    assert cluster4.heights() == [0, 0, 0, 0] and cluster4.sent == []


def test_request_executes_once_even_if_submitted_again(cluster4: Cluster) -> None:
    cluster4.submit(request(1))
    cluster4.deliver()
    cluster4.submit(request(1))
    cluster4.submit(request(2))
    cluster4.deliver()
    assert [r.timestamp for r in cluster4.executed[1]] == [1, 2]


def test_stale_timestamp_is_skipped_when_batched_with_newer(cluster4: Cluster) -> None:
    cluster4.submit(request(5))
    cluster4.deliver()
    cluster4.submit(request(3))
    cluster4.deliver()
    assert [r.timestamp for r in cluster4.executed[0]] == [5]


def test_duplicate_prepares_from_one_signer_count_once(cluster4: Cluster) -> None:
    # Prepare: replica 1 gets the PRE-PREPARE and one backup's PREPARE, three times.
    cluster4.submit(request(1), to=[0])
    pre = next(m for _, _, m in cluster4.queue if isinstance(m, PrePrepare))
    cluster4.queue.clear()
    cluster4.replicas[1].step(pre)
    cluster4.collect(1)
    prepare = Prepare(view=0, height=1, digest=pre.digest, sender=2)
    prepare.signature = cluster4.keys.signer(2)(prepare.signed)
    # Execute
    for _ in range(3):
        cluster4.replicas[1].step(prepare)
    cluster4.collect(1)
    # Assert: own + one other = 2 prepares = 2f, so replica 1 is prepared and
    # commits once; a third copy of replica 2's prepare changes nothing.
    commits = [m for src, _, m in cluster4.queue if src == 1 and isinstance(m, Commit)]
    assert len({(m.view, m.height) for m in commits}) == 1
    assert len(cluster4.replicas[1]._prepares[(0, 1)]) == 2


def test_vote_signed_by_another_key_is_not_counted(cluster4: Cluster) -> None:
    cluster4.submit(request(1), to=[0])
    pre = next(m for _, _, m in cluster4.queue if isinstance(m, PrePrepare))
    cluster4.replicas[1].step(pre)
    forged = Prepare(view=0, height=1, digest=pre.digest, sender=2)
    forged.signature = cluster4.keys.signer(3)(forged.signed)  # key of 3, claims 2
    cluster4.replicas[1].step(forged)
    assert 2 not in cluster4.replicas[1]._prepares.get((0, 1), {})


def test_prepare_signature_does_not_count_as_commit(cluster4: Cluster) -> None:
    cluster4.submit(request(1), to=[0])
    pre = next(m for _, _, m in cluster4.queue if isinstance(m, PrePrepare))
    prepare = Prepare(view=0, height=1, digest=pre.digest, sender=2)
    prepare.signature = cluster4.keys.signer(2)(prepare.signed)
    replayed = Commit(view=0, height=1, digest=pre.digest, sender=2)
    replayed.signature = prepare.signature
    cluster4.replicas[1].step(pre)
    cluster4.replicas[1].step(replayed)
    assert (0, 1) not in cluster4.replicas[1]._commits or 2 not in cluster4.replicas[1]._commits[
        (0, 1)
    ]


def test_backup_relays_request_to_primary(cluster4: Cluster) -> None:
    cluster4.submit(request(1), to=[2])
    assert any(isinstance(m, Forward) and dst == 0 for _, dst, m in cluster4.queue)
    cluster4.deliver()
    assert cluster4.heights() == [1, 1, 1, 1]


def test_backup_starts_view_change_when_primary_ignores_its_request(cluster4: Cluster) -> None:
    # Prepare: the primary never hears of the request.
    cluster4.down.add(0)
    cluster4.submit(request(1), to=[2])
    cluster4.queue.clear()
    # Execute
    cluster4.tick(25)
    # Assert
    assert any(isinstance(m, ViewChange) and src == 2 for src, _, m in cluster4.sent)


def test_view_change_after_primary_crash() -> None:
    cluster = Cluster(4)
    cluster.down.add(0)
    cluster.submit(request(1))
    cluster.tick(60)
    assert cluster.heights()[1:] == [1, 1, 1]
    assert all(r.view >= 1 and r.active for r in cluster.replicas[1:])


def test_view_change_after_invalid_proposal() -> None:
    # Prepare: the application rejects operation b"bad"; a faulty primary proposes it.
    cluster = Cluster(4, validate=lambda block: b"bad" not in block.payload)
    block = Block.propose(
        height=1,
        previous_hash=GENESIS_HASH,
        view=0,
        proposer=0,
        payload=encode_batch([Request("mallory", 1, b"bad", b"")]),
    )
    pre = PrePrepare(view=0, height=1, block=block, sender=0)
    pre.signature = cluster.keys.signer(0)(pre.signed)
    # Execute
    for backup in (1, 2, 3):
        cluster.replicas[backup].step(pre)
        cluster.collect(backup)
    cluster.deliver()
    # Assert: backups refused to PREPARE and moved to view 1.
    assert not any(isinstance(m, Prepare) for _, _, m in cluster.sent)
    assert {src for src, _, m in cluster.sent if isinstance(m, ViewChange)} >= {1, 2, 3}
    assert all(r.view == 1 and r.active for r in cluster.replicas[1:])


def test_honest_primary_drops_requests_its_application_rejects() -> None:
    cluster = Cluster(4, validate=lambda block: b"bad" not in block.payload)
    cluster.submit(Request("mallory", 1, b"bad", b""), to=[0])
    cluster.submit(request(1))
    cluster.deliver()
    assert cluster.heights() == [1, 1, 1, 1]
    assert [r.operation for r in cluster.executed[0]] == [b"op-1"]


def test_replica_joins_view_change_when_f_plus_one_ask() -> None:
    cluster = Cluster(4)
    # Replicas 1 and 2 time out (0 is silent towards them); 3 still hears 0.
    cluster.down.add(0)
    cluster.submit(request(1), to=[1, 2])
    cluster.queue.clear()
    for _ in range(25):
        for i in (1, 2):
            cluster.replicas[i].tick()
            cluster.collect(i)
    cluster.deliver(allow=lambda src, dst, m: dst == 3)
    assert cluster.replicas[3].view == 1 and not cluster.replicas[3].active


def test_view_change_timeout_doubles_on_consecutive_failed_views() -> None:
    # Prepare: n=7; the primaries of views 1 and 2 are down, 0's proposal is lost.
    cluster = Cluster(7)
    cluster.down.update({1, 2})
    cluster.submit(request(1), to=[0, 3, 4, 5, 6])
    cluster.queue.clear()
    muted = lambda src, dst, m: not isinstance(m, PrePrepare) or m.view > 0  # noqa: E731
    entered: dict[int, int] = {}
    # Execute
    for tick in range(1, 400):
        cluster.tick(1, allow=muted)
        view = cluster.replicas[3].view
        entered.setdefault(view, tick)
    # Assert: view 3 is reached and the wait in view 2 lasted twice the wait in view 1.
    assert cluster.replicas[3].view == 3 and cluster.replicas[3].active
    assert entered[3] - entered[2] == 2 * (entered[2] - entered[1])


def test_new_view_with_wrong_reissue_set_is_rejected() -> None:
    # Prepare: a block is prepared everywhere but committed nowhere, then view 1.
    cluster = Cluster(4)
    cluster.submit(request(1), to=[0])
    cluster.deliver(allow=lambda src, dst, m: not isinstance(m, Commit))
    for replica in (cluster.replicas[2], cluster.replicas[3]):
        replica._start_view_change(1)
    cluster.collect(2)
    cluster.collect(3)
    cluster.replicas[1]._start_view_change(1)
    vcs = [m for _, _, m in cluster.queue if isinstance(m, ViewChange)]
    own = cluster.replicas[1]._own_view_changes[1]
    view_changes = sorted({m.sender: m for m in [*vcs, own]}.values(), key=lambda m: m.sender)[:3]
    # The prepared block must be re-issued; an empty set is a lie.
    forged = NewView(view=1, view_changes=view_changes, pre_prepares=[], sender=1)
    forged.signature = cluster.keys.signer(1)(forged.signed)
    # Execute
    cluster.replicas[3].step(forged)
    # Assert
    assert cluster.replicas[3].view == 2 and not cluster.replicas[3].active


def test_new_view_reissues_the_prepared_block() -> None:
    cluster = Cluster(4)
    cluster.submit(request(1), to=[0])
    cluster.deliver(allow=lambda src, dst, m: not isinstance(m, Commit))
    digest = cluster.replicas[1]._prepared.digest  # type: ignore[union-attr]
    cluster.down.add(0)
    cluster.tick(80)
    assert cluster.heights()[1:] == [1, 1, 1]
    assert cluster.stores[2].head().digest == digest  # type: ignore[union-attr]


def test_log_stays_bounded_over_1000_blocks() -> None:
    # Prepare
    sim = Simulation(n=4, seed=1, blocks=1000, faults=False)
    largest = 0
    # Execute
    while min(sim.honest_heights()) < 1000:
        sim.step_tick()
        largest = max(largest, *(i.replica.log_size() for i in sim.instances))  # type: ignore[union-attr]
    # Assert: O(n) entries whatever the chain length.
    assert largest <= 40


def test_restarted_replica_fetches_missing_blocks_and_rejoins() -> None:
    # Prepare: replica 3 is down while 30 blocks commit.
    sim = Simulation(n=4, seed=2, blocks=60, faults=False)
    sim.crash(3)
    while min(sim.honest_heights()[:3]) < 30:
        sim.step_tick()
    # Execute
    sim.restart(3)
    result = sim.run()
    # Assert
    assert result.ok
    assert sim.instances[3].replica.height >= 60  # type: ignore[union-attr]


def test_restarted_replica_does_not_vote_in_its_persisted_view() -> None:
    keys = FakeKeyring(4, __import__("random").Random(1))
    replica = Replica(
        replica_id=1,
        n=4,
        sign=keys.signer(1),
        verify=keys.verify,
        validate=lambda block: True,
        chain=MemoryBlockStore(),
        restored_view=0,
    )
    primary = Replica(
        replica_id=0,
        n=4,
        sign=keys.signer(0),
        verify=keys.verify,
        validate=lambda block: True,
        chain=MemoryBlockStore(),
    )
    primary.propose(request(1))
    [(_, pre)] = primary.ready().messages
    replica.step(pre)
    assert not replica.has_ready()


def test_ready_must_be_advanced_before_the_next_ready(cluster4: Cluster) -> None:
    replica = cluster4.replicas[0]
    replica.propose(request(1))
    replica.ready()
    try:
        replica.ready()
    except RuntimeError:
        return
    raise AssertionError("second ready() without advance() must fail")


def test_committed_pending_shows_commits_before_they_are_handed_over(cluster4: Cluster) -> None:
    # Prepare: let the request reach every replica, then deliver votes to
    # replica 2 without collecting its output
    cluster4.submit(request(1))
    seen: tuple = ()
    # Execute
    while cluster4.queue:
        _src, dst, message = cluster4.queue.pop(0)
        cluster4.replicas[dst].step(message)
        if dst == 2 and cluster4.replicas[2].committed_pending():
            seen = cluster4.replicas[2].committed_pending()
            break
        cluster4.collect(dst)
    # Assert: the pending commit is exactly what the next Ready hands over, then gone
    assert [c.block.height for c in seen] == [1]
    ready = cluster4.replicas[2].ready()
    assert [c.block.digest for c in ready.committed] == [c.block.digest for c in seen]
    assert cluster4.replicas[2].committed_pending() == ()
