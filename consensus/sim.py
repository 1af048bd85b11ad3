"""Deterministic network simulator, Byzantine adversaries and safety/liveness checkers.

One seeded ``random.Random`` drives everything: message delay, drop,
duplication and reordering, partitions and heals, crashes and restarts from
the block store, and Byzantine replicas (equivocating primary, double votes,
votes signed by the wrong key, replays across view and phase, forged
VIEW-CHANGE proofs, NEW-VIEW with a wrong re-issue set, invalid proposals,
withheld messages, and Twins: two replicas sharing one key). The replicas
are the real :class:`~consensus.replica.Replica`; only the wiring is fake,
like the in-memory network of etcd's raft tests.

After every delivery the checker asserts the safety properties of Castro &
Liskov (OSDI 1999): agreement (no two honest replicas commit different
blocks at a height), no fork (each honest chain grows one height at a time,
so with agreement all honest chains are prefixes of each other), validity
(every committed block was proposed and passed validation at an honest
replica), and monotone views. Liveness: once the network heals with at
most f faulty replicas, every honest replica must reach the target height
within a bounded number of ticks. A failing seed prints a one-line replay
command (:attr:`SimResult.replay`).
"""

from __future__ import annotations

import hashlib
import heapq
import random
from collections.abc import Callable
from pathlib import Path
from typing import Final

from consensus.ledger import (
    Block,
    CommitCertificate,
    Request,
    decode_batch,
    encode_batch,
    max_faulty,
)
from consensus.messages import (
    Commit,
    Message,
    NewView,
    Prepare,
    PreparedCertificate,
    PrePrepare,
    ViewChange,
    decode_message,
)
from consensus.replica import Replica
from consensus.store import BlockStore, MemoryBlockStore

BEHAVIOURS: Final = (
    "equivocate",
    "double_vote",
    "wrong_signer",
    "replay",
    "forge_view_change",
    "bad_new_view",
    "invalid_proposal",
    "withhold",
    "twins",
)
INVALID_OPERATION: Final = b"INVALID"


class FakeKeyring:
    """Fast stand-in for Ed25519: sig = keyed BLAKE2b(secret of signer, payload).

    Unforgeable inside the simulation because adversaries only ever get the
    secrets of the replicas they control.
    """

    __slots__ = ("_secrets",)

    def __init__(self, n: int, rng: random.Random) -> None:
        self._secrets = [rng.randbytes(32) for _ in range(n)]

    def signer(self, replica_id: int) -> Callable[[bytes], bytes]:
        secret = self._secrets[replica_id]

        def sign(payload: bytes) -> bytes:
            return hashlib.blake2b(payload, key=secret, digest_size=16).digest()

        return sign

    def verify(self, signer: int, payload: bytes, signature: bytes) -> bool:
        if not 0 <= signer < len(self._secrets):
            return False
        expected = hashlib.blake2b(payload, key=self._secrets[signer], digest_size=16).digest()
        return expected == signature


class NoopKeyring:
    """No signatures at all: measures the pure protocol cost (bench ``--perf``)."""

    __slots__ = ()

    def signer(self, replica_id: int) -> Callable[[bytes], bytes]:
        return _empty_signature

    def verify(self, signer: int, payload: bytes, signature: bytes) -> bool:
        return True


def _empty_signature(payload: bytes) -> bytes:
    return b""


class SafetyChecker:
    """Incremental agreement / no-fork / validity / monotone-view checks."""

    __slots__ = ("committed", "heights", "proposed", "validated", "views", "violations")

    def __init__(self) -> None:
        self.committed: dict[int, bytes] = {}
        self.heights: dict[int, int] = {}
        self.views: dict[int, int] = {}
        self.validated: set[bytes] = set()
        self.proposed: set[bytes] = set()
        self.violations: list[str] = []

    def on_commit(self, replica_id: int, block: Block) -> None:
        height, digest = block.height, block.digest
        previous = self.heights.get(replica_id, 0)
        if height != previous + 1:
            self.violations.append(
                f"replica {replica_id} committed height {height} after {previous} (fork/gap)"
            )
        self.heights[replica_id] = height
        known = self.committed.setdefault(height, digest)
        if known != digest:
            self.violations.append(
                f"agreement: replica {replica_id} committed {digest.hex()[:12]} at height "
                f"{height}, another honest replica committed {known.hex()[:12]}"
            )
        if digest not in self.proposed or digest not in self.validated:
            self.violations.append(
                f"validity: block {digest.hex()[:12]} at height {height} was never "
                "proposed, or never passed validation at an honest replica"
            )

    def on_view(self, replica_id: int, view: int) -> None:
        previous = self.views.get(replica_id, 0)
        if view < previous:
            self.violations.append(f"replica {replica_id} went back from view {previous} to {view}")
        self.views[replica_id] = max(previous, view)


class SimResult:
    __slots__ = (
        "blocks_committed",
        "byzantine",
        "liveness_failure",
        "messages",
        "replay",
        "seed",
        "ticks",
        "violations",
    )

    def __init__(
        self,
        *,
        seed: int,
        blocks_committed: int,
        violations: list[str],
        liveness_failure: str | None,
        ticks: int,
        messages: int,
        replay: str,
        byzantine: dict[int, str],
    ) -> None:
        self.seed = seed
        self.blocks_committed = blocks_committed
        self.violations = violations
        self.liveness_failure = liveness_failure
        self.ticks = ticks
        self.messages = messages
        self.replay = replay
        self.byzantine = byzantine

    @property
    def ok(self) -> bool:
        return not self.violations and self.liveness_failure is None


class Instance:
    """One running replica process in the simulation (twins share a replica id)."""

    __slots__ = (
        "adversary",
        "audience",
        "crashed",
        "honest",
        "index",
        "replica",
        "replica_id",
        "restart_at",
        "side",
        "store",
    )

    def __init__(
        self, *, index: int, replica_id: int, store: MemoryBlockStore | BlockStore
    ) -> None:
        self.index = index
        self.replica_id = replica_id
        self.store = store
        self.replica: Replica | None = None
        self.honest = True
        self.adversary: Adversary | None = None
        self.crashed = False
        self.restart_at = 0
        self.side = 0
        self.audience: frozenset[int] | None = None


class Adversary:
    """A Byzantine replica: the honest state machine with its output rewritten."""

    __slots__ = ("behaviour", "history", "keys", "rng", "sim")

    def __init__(self, *, behaviour: str, sim: Simulation, rng: random.Random) -> None:
        self.behaviour = behaviour
        self.sim = sim
        self.rng = rng
        self.keys = sim.keyring
        self.history: list[Message] = []

    def _sign(self, replica_id: int, message: Message) -> Message:
        message.signature = self.keys.signer(replica_id)(message.signed)
        return message

    def _halves(self, me: int) -> tuple[list[int], list[int]]:
        others = [i for i in range(self.sim.n) if i != me]
        self.rng.shuffle(others)
        half = len(others) // 2
        return others[:half], others[half:]

    def _alternative(self, block: Block, *, operation: bytes) -> Block:
        requests = decode_batch(block.payload)
        extra = Request("byzantine", self.rng.randrange(1 << 40), operation, b"")
        header = block.header
        return Block.propose(
            height=header.height,
            previous_hash=header.previous_hash,
            view=header.view,
            proposer=header.proposer,
            payload=encode_batch([*requests, extra]),
        )

    def outgoing(
        self, inst: Instance, messages: list[tuple[int | None, Message]]
    ) -> list[tuple[int | None, Message]]:
        me = inst.replica_id
        behaviour = self.behaviour
        out: list[tuple[int | None, Message]] = []
        for dest, message in messages:
            kind = type(message)
            if behaviour == "withhold":
                continue
            if kind is PrePrepare and behaviour in ("equivocate", "invalid_proposal"):
                pre: PrePrepare = message  # type: ignore[assignment]
                if pre.block.header.view == pre.view:
                    out.extend(self._equivocate(me, pre, behaviour=behaviour))
                    continue
            if kind in (Prepare, Commit):
                vote: Prepare = message  # type: ignore[assignment]
                if behaviour == "double_vote":
                    fake = kind(
                        view=vote.view,
                        height=vote.height,
                        digest=self.rng.randbytes(32),
                        sender=me,
                    )
                    out.append((self.rng.randrange(self.sim.n), self._sign(me, fake)))
                elif behaviour == "wrong_signer":
                    claimed = self.rng.choice([i for i in range(self.sim.n) if i != me])
                    forged = kind(
                        view=vote.view, height=vote.height, digest=vote.digest, sender=claimed
                    )
                    forged.signature = self.keys.signer(me)(forged.signed)
                    out.append((dest, forged))
                    continue
            if kind is NewView and behaviour == "bad_new_view":
                out.append((dest, self._bad_new_view(me, message)))  # type: ignore[arg-type]
                continue
            if behaviour == "replay" and len(self.history) < 256:
                self.history.append(message)
            out.append((dest, message))
        return out

    def _equivocate(
        self, me: int, pre: PrePrepare, *, behaviour: str
    ) -> list[tuple[int | None, Message]]:
        operation = INVALID_OPERATION if behaviour == "invalid_proposal" else b"equivocation"
        alt_block = self._alternative(pre.block, operation=operation)
        alt = self._sign(
            me, PrePrepare(view=pre.view, height=pre.height, block=alt_block, sender=me)
        )
        if behaviour == "invalid_proposal":
            return [(None, alt)]
        first, second = self._halves(me)
        out: list[tuple[int | None, Message]] = []
        for side, proposal in ((first, pre), (second, alt)):
            # Back each side's block with a COMMIT of our own: a double vote.
            commit = Commit(view=pre.view, height=pre.height, digest=proposal.digest, sender=me)
            self._sign(me, commit)
            out.extend((i, m) for i in side for m in (proposal, commit))
        return out

    def _bad_new_view(self, me: int, nv: NewView) -> NewView:
        if nv.pre_prepares:
            pre_prepares: list[PrePrepare] = []
        else:
            checkpoint = max(vc.checkpoint_height for vc in nv.view_changes)
            digest = max(nv.view_changes, key=lambda vc: vc.checkpoint_height).checkpoint_digest
            block = Block.propose(
                height=checkpoint + 1,
                previous_hash=digest,
                view=nv.view,
                proposer=me,
                payload=encode_batch([]),
            )
            pre = PrePrepare(view=nv.view, height=checkpoint + 1, block=block, sender=me)
            pre_prepares = [self._sign(me, pre)]  # type: ignore[list-item]
        forged = NewView(
            view=nv.view, view_changes=nv.view_changes, pre_prepares=pre_prepares, sender=me
        )
        return self._sign(me, forged)  # type: ignore[return-value]

    def on_tick(self, inst: Instance) -> list[tuple[int | None, Message]]:
        me = inst.replica_id
        replica = inst.replica
        assert replica is not None
        rng = self.rng
        if self.behaviour == "replay" and self.history:
            old = rng.choice(self.history)
            out: list[tuple[int | None, Message]] = [(rng.randrange(self.sim.n), old)]
            if isinstance(old, (Prepare, Commit)):
                # Cross-phase replay: the same fields and signature under the other tag.
                other = Commit if isinstance(old, Prepare) else Prepare
                swapped = other(view=old.view, height=old.height, digest=old.digest, sender=me)
                swapped.signature = old.signature
                out.append((None, swapped))
            return out
        if self.behaviour == "forge_view_change" and rng.random() < 0.2:
            return [(None, self._forged_view_change(me, replica))]
        return []

    def _forged_view_change(self, me: int, replica: Replica) -> ViewChange:
        n, f = self.sim.n, max_faulty(self.sim.n)
        sign_me = self.keys.signer(me)
        height = replica.height
        view = replica.view
        primary = view % n
        block = Block.propose(
            height=height + 1,
            previous_hash=replica.head_hash,
            view=view,
            proposer=primary,
            payload=encode_batch([Request("forged", 1, b"forged", b"")]),
        )
        pre = PrePrepare(view=view, height=height + 1, block=block, sender=primary)
        pre.signature = sign_me(pre.signed)  # signed by the wrong key
        prepares = []
        for backup in [i for i in range(n) if i != primary][: 2 * f]:
            prepare = Prepare(view=view, height=height + 1, digest=block.digest, sender=backup)
            prepare.signature = sign_me(prepare.signed)
            prepares.append(prepare)
        if self.rng.random() < 0.5:
            return self._sign(  # type: ignore[return-value]
                me,
                ViewChange(
                    new_view=view + 1,
                    checkpoint_height=height,
                    checkpoint_digest=replica.head_hash,
                    checkpoint=replica._head_cert,
                    prepared=[PreparedCertificate(pre, prepares)],
                    sender=me,
                ),
            )
        # A checkpoint claimed far ahead, with a certificate only we signed.
        fake_digest = self.rng.randbytes(32)
        cert = CommitCertificate(
            view=view,
            height=height + 5,
            digest=fake_digest,
            signatures=[(i, sign_me(b"x")) for i in range(2 * f + 1)],
        )
        return self._sign(  # type: ignore[return-value]
            me,
            ViewChange(
                new_view=view + 1,
                checkpoint_height=height + 5,
                checkpoint_digest=fake_digest,
                checkpoint=cert,
                prepared=[],
                sender=me,
            ),
        )


class Collusion:
    """f+1 colluding replicas: an equivocating primary plus voters that back both sides.

    This exceeds the fault threshold on purpose: the checker must then report
    a violation, which proves the checker can fail.
    """

    __slots__ = ("members", "rng", "sides", "sim")

    def __init__(self, *, members: list[int], sim: Simulation, rng: random.Random) -> None:
        self.members = members
        self.sim = sim
        self.rng = rng
        honest = [i for i in range(sim.n) if i not in members]
        rng.shuffle(honest)
        half = len(honest) // 2
        self.sides = (honest[:half], honest[half:])

    def outgoing(
        self, inst: Instance, messages: list[tuple[int | None, Message]]
    ) -> list[tuple[int | None, Message]]:
        out: list[tuple[int | None, Message]] = []
        keys = self.sim.keyring
        for dest, message in messages:
            kind = type(message)
            if kind in (Prepare, Commit):
                # Colluders vote only through the attack below.
                out.extend((m, message) for m in self.members if m != inst.replica_id)
                continue
            if kind is PrePrepare and message.block.header.view == message.view:  # type: ignore[attr-defined]
                out.extend(self._attack(message, keys))  # type: ignore[arg-type]
                continue
            out.append((dest, message))
        return out

    def _attack(
        self, pre: PrePrepare, keys: FakeKeyring | NoopKeyring
    ) -> list[tuple[int | None, Message]]:
        requests = decode_batch(pre.block.payload)
        header = pre.block.header
        alt_block = Block.propose(
            height=header.height,
            previous_hash=header.previous_hash,
            view=header.view,
            proposer=header.proposer,
            payload=encode_batch([*requests, Request("colluder", 1, b"fork", b"")]),
        )
        alt = PrePrepare(view=pre.view, height=pre.height, block=alt_block, sender=pre.sender)
        alt.signature = keys.signer(pre.sender)(alt.signed)
        out: list[tuple[int | None, Message]] = []
        for side, proposal in zip(self.sides, (pre, alt), strict=False):
            for target in side:
                out.append((target, proposal))
                for member in self.members:
                    sign = keys.signer(member)
                    kinds = (Commit,) if member == pre.sender else (Prepare, Commit)
                    for kind in kinds:
                        vote = kind(
                            view=pre.view, height=pre.height, digest=proposal.digest, sender=member
                        )
                        vote.signature = sign(vote.signed)
                        out.append((target, vote))
        return out

    def on_tick(self, inst: Instance) -> list[tuple[int | None, Message]]:
        return []


def simulated_validate(block: Block) -> bool:
    """The simulator's application check: no request may carry INVALID."""
    return all(request.operation != INVALID_OPERATION for request in block.requests())


class Simulation:
    """A seeded run of n replicas until every honest one has committed ``blocks`` blocks."""

    def __init__(
        self,
        *,
        n: int,
        seed: int,
        blocks: int,
        faults: bool = True,
        byzantine: int | None = None,
        behaviours: tuple[str, ...] | None = None,
        assign: dict[int, str] | None = None,
        wire: bool = True,
        fast: bool = False,
        store_dir: Path | None = None,
        timeout: int = 20,
    ) -> None:
        self.n = n
        self.f = max_faulty(n)
        self.seed = seed
        self.blocks = blocks
        self.faults = faults
        self.forced = byzantine
        self.wire = wire
        self.fast = fast
        self.timeout = timeout
        self.store_dir = store_dir
        self.rng = random.Random(seed)
        self.keyring: FakeKeyring | NoopKeyring = (
            NoopKeyring() if fast else FakeKeyring(n, self.rng)
        )
        self.checker = SafetyChecker()
        self.now = 0
        self.messages = 0
        self._seq = 0
        self._queue: list[tuple[int, int, int, Message]] = []
        self._partition_until = 0
        self._drop = self._dup = 0.0
        self._max_delay = 0
        self._client_clock = 0
        self.instances: list[Instance] = []
        self._setup(byzantine=byzantine, behaviours=behaviours, assign=assign or {})

    # ------------------------------------------------------------- set-up

    def _new_store(self, replica_id: int, index: int) -> MemoryBlockStore | BlockStore:
        if self.store_dir is None:
            return MemoryBlockStore()
        path = self.store_dir / f"replica-{index}.sqlite"
        return BlockStore(path, verify=self.keyring.verify, n=self.n)

    def _make_replica(self, inst: Instance, *, restored: bool) -> Replica:
        view = inst.store.load_view() if restored else None
        if restored and view is None:
            view = 0
        validate = simulated_validate
        if inst.honest:
            validated = self.checker.validated

            def validate(block: Block) -> bool:
                ok = simulated_validate(block)
                if ok:
                    validated.add(block.digest)
                return ok

        return Replica(
            replica_id=inst.replica_id,
            n=self.n,
            sign=self.keyring.signer(inst.replica_id),
            verify=self.keyring.verify,
            validate=validate,
            chain=inst.store,
            restored_view=view,
            timeout=self.timeout,
        )

    def _setup(
        self,
        *,
        byzantine: int | None,
        behaviours: tuple[str, ...] | None,
        assign: dict[int, str],
    ) -> None:
        rng = self.rng
        n, f = self.n, self.f
        for i in range(n):
            self.instances.append(Instance(index=i, replica_id=i, store=self._new_store(i, i)))
        if self.faults:
            self._drop = rng.choice((0.0, 0.01, 0.05, 0.1))
            self._dup = rng.choice((0.0, 0.02, 0.05))
            self._max_delay = rng.choice((0, 1, 2, 3))
        if assign:
            count = 0
        elif byzantine is not None:
            count = byzantine
        elif behaviours:
            count = 1
        else:
            count = rng.randint(0, f) if self.faults else 0
        members = sorted(rng.sample(range(n), count))
        if count > f and not assign:
            # Over the threshold: collude around the first primary.
            members = sorted({0, *rng.sample(range(1, n), count - 1)})
            collusion = Collusion(members=members, sim=self, rng=random.Random(rng.random()))
            for m in members:
                self.instances[m].honest = False
                self.instances[m].adversary = collusion  # type: ignore[assignment]
        else:
            chosen = {m: rng.choice(behaviours or BEHAVIOURS) for m in members} | assign
            for m, behaviour in sorted(chosen.items()):
                inst = self.instances[m]
                inst.honest = False
                if behaviour == "twins":
                    self._add_twin(inst)
                else:
                    inst.adversary = Adversary(
                        behaviour=behaviour, sim=self, rng=random.Random(rng.random())
                    )
        for inst in self.instances:
            inst.replica = self._make_replica(inst, restored=False)
        self._by_id = [[x.index for x in self.instances if x.replica_id == i] for i in range(n)]

    def _add_twin(self, inst: Instance) -> None:
        others = [i for i in range(self.n) if i != inst.replica_id]
        self.rng.shuffle(others)
        half = len(others) // 2
        twin = Instance(
            index=len(self.instances), replica_id=inst.replica_id, store=MemoryBlockStore()
        )
        twin.honest = False
        inst.audience = frozenset(others[:half])
        twin.audience = frozenset(others[half:])
        self.instances.append(twin)

    @property
    def byzantine(self) -> dict[int, str]:
        out = {}
        for inst in self.instances:
            if not inst.honest:
                adversary = inst.adversary
                out[inst.replica_id] = (
                    "twins" if adversary is None else getattr(adversary, "behaviour", "collude")
                )
        return out

    # ------------------------------------------------------------ network

    def _send(self, src: Instance, dest: int | None, message: Message) -> None:
        if self.wire:
            message = decode_message(message.encode())
        rng = self.rng
        targets = (
            [
                x
                for x in range(len(self.instances))
                if self.instances[x].replica_id != src.replica_id
            ]
            if dest is None
            else self._by_id[dest]
            if 0 <= dest < self.n
            else []
        )
        audience = src.audience
        now = self.now
        partitioned = now < self._partition_until
        queue = self._queue
        for target in targets:
            inst = self.instances[target]
            if audience is not None and inst.replica_id not in audience:
                continue
            if partitioned and inst.side != src.side:
                continue
            copies = 1
            if self.faults:
                if rng.random() < self._drop:
                    continue
                if rng.random() < self._dup:
                    copies = 2
            for _ in range(copies):
                delay = rng.randint(0, self._max_delay) if self._max_delay else 0
                self._seq += 1
                heapq.heappush(queue, (now + delay, self._seq, target, message))

    def _flush(self, inst: Instance) -> None:
        replica = inst.replica
        assert replica is not None
        if not replica.has_ready():
            return
        ready = replica.ready()
        store = inst.store
        if ready.view is not None:
            store.save_view(ready.view)
            if inst.honest:
                self.checker.on_view(inst.replica_id, ready.view)
        for block in ready.blocks:
            store.append(block)
        if inst.honest:
            for committed in ready.committed:
                self.checker.on_commit(inst.replica_id, committed.block)
        messages = ready.messages
        if inst.adversary is not None:
            messages = inst.adversary.outgoing(inst, messages)
        proposed = self.checker.proposed
        for dest, message in messages:
            if type(message) is PrePrepare:
                proposed.add(message.digest)  # type: ignore[attr-defined]
            self._send(inst, dest, message)
        replica.advance()

    def _deliver_due(self) -> None:
        queue = self._queue
        instances = self.instances
        checker = self.checker
        while queue and queue[0][0] <= self.now:
            _, _, target, message = heapq.heappop(queue)
            inst = instances[target]
            if inst.crashed:
                continue
            self.messages += 1
            inst.replica.step(message)  # type: ignore[union-attr]
            self._flush(inst)
            if checker.violations:
                return

    # ------------------------------------------------------------- faults

    def _faulty_now(self) -> int:
        count = sum(1 for i in range(self.n) if not self.instances[i].honest)
        for inst in self.instances[: self.n]:
            if inst.honest:
                replica = inst.replica
                assert replica is not None
                recovering = replica._abstain_through >= replica.view or not replica.active
                if inst.crashed or (recovering and replica._abstain_through >= 0):
                    count += 1
        return count

    def _inject_faults(self) -> None:
        rng = self.rng
        if self.now >= self._partition_until and rng.random() < 0.01:
            self._partition_until = self.now + rng.randint(5, 80)
            for inst in self.instances:
                inst.side = rng.randrange(2)
        if rng.random() < 0.01 and self._faulty_now() < self.f:
            candidates = [x for x in self.instances[: self.n] if x.honest and not x.crashed]
            victim = rng.choice(candidates)
            victim.crashed = True
            victim.restart_at = self.now + rng.randint(10, 120)

    def _restart_due(self, *, force: bool) -> None:
        for inst in self.instances:
            if inst.crashed and (force or self.now >= inst.restart_at):
                if isinstance(inst.store, BlockStore):
                    inst.store.close()
                    inst.store = self._new_store(inst.replica_id, inst.index)
                inst.crashed = False
                inst.replica = self._make_replica(inst, restored=True)

    def _heal(self) -> None:
        self._partition_until = 0
        self._drop = self._dup = 0.0
        self._max_delay = min(self._max_delay, 1)
        self._restart_due(force=True)

    def crash(self, replica_id: int) -> None:
        """Test hook: crash a replica now (it restarts only through :meth:`restart`)."""
        inst = self.instances[replica_id]
        inst.crashed = True
        inst.restart_at = 1 << 62

    def restart(self, replica_id: int) -> None:
        inst = self.instances[replica_id]
        inst.restart_at = self.now
        self._restart_due(force=False)

    # ------------------------------------------------------------ workload

    def submit(self, request: Request, *, to: list[int] | None = None) -> None:
        for inst in self.instances:
            if inst.crashed or (to is not None and inst.replica_id not in to):
                continue
            inst.replica.propose(request)  # type: ignore[union-attr]
            self._flush(inst)

    def _workload(self) -> None:
        self._client_clock += 1
        client = f"client-{self._client_clock % 4}"
        request = Request(client, self._client_clock, b"op-%d" % self._client_clock, b"")
        if self.fast:
            primary = self.instances[0].replica
            assert primary is not None
            self.submit(request, to=[primary.primary])
        elif self.faults and self.rng.random() < 0.2:
            self.submit(request, to=[self.rng.randrange(self.n)])
        else:
            self.submit(request)

    # ---------------------------------------------------------------- run

    def honest_heights(self) -> list[int]:
        return [
            inst.replica.height  # type: ignore[union-attr]
            for inst in self.instances[: self.n]
            if inst.honest
        ]

    def step_tick(self) -> None:
        """One tick: deliver due messages, submit work, tick every live replica."""
        self._deliver_due()
        if self.checker.violations:
            return
        self.now += 1
        self._workload()
        for inst in self.instances:
            if inst.crashed:
                continue
            inst.replica.tick()  # type: ignore[union-attr]
            if inst.adversary is not None:
                for dest, message in inst.adversary.on_tick(inst):
                    self._send(inst, dest, message)
            self._flush(inst)

    def run(self) -> SimResult:
        target = self.blocks
        healed_at: int | None = None if self.faults else 0
        fault_cap = 40 * target + 2000
        liveness_ticks = 4000 + 40 * target
        liveness_failure: str | None = None
        while not self.checker.violations:
            heights = self.honest_heights()
            if heights and min(heights) >= target:
                break
            if healed_at is None:
                if max(heights, default=target) >= target // 2 or self.now >= fault_cap:
                    self._heal()
                    healed_at = self.now
                else:
                    self._inject_faults()
                    self._restart_due(force=False)
            elif self.now - healed_at > liveness_ticks:
                liveness_failure = (
                    f"honest heights {heights} below {target} {liveness_ticks} ticks after heal"
                )
                break
            self.step_tick()
        return SimResult(
            seed=self.seed,
            blocks_committed=min(self.honest_heights(), default=0),
            violations=list(self.checker.violations),
            liveness_failure=liveness_failure,
            ticks=self.now,
            messages=self.messages,
            replay=self.replay_command(),
            byzantine=self.byzantine,
        )

    def replay_command(self) -> str:
        command = (
            f"python bench/consensus_soak.py --replicas {self.n} --seed {self.seed} "
            f"--blocks {self.blocks}"
        )
        if self.forced is not None:
            command += f" --byzantine {self.forced}"
        if not self.faults:
            command += " --no-faults"
        return command


def run_seed(
    *, n: int, seed: int, blocks: int, byzantine: int | None = None, faults: bool = True
) -> SimResult:
    """Run one seeded simulation; the bench and the tests both call this."""
    return Simulation(n=n, seed=seed, blocks=blocks, byzantine=byzantine, faults=faults).run()
