"""The PBFT replica state machine (no I/O, no clock, no randomness).

Implements the normal case, view change and NEW-VIEW of Castro & Liskov,
"Practical Byzantine Fault Tolerance" (OSDI 1999) and "Practical Byzantine
Fault Tolerance and Proactive Recovery" (TOCS 2002), shaped like etcd's raft
library: the caller feeds messages (:meth:`Replica.step`), time
(:meth:`Replica.tick`) and client requests (:meth:`Replica.propose`), then
collects a :class:`Ready` (messages to send, blocks to persist, committed
blocks, the view to persist) and calls :meth:`Replica.advance`::

    replica.step(message)
    ready = replica.ready()   # persist ready.view and ready.blocks, then send
    replica.advance()

Design choices, and why:

* One block in flight. The primary proposes height h+1 only after it has
  executed h, and a replica votes on h+1 only once it has executed h, so it
  can check the link to h and run the application's ``validate``. Hence a
  VIEW-CHANGE carries at most one prepared certificate (for checkpoint+1)
  and the NEW-VIEW re-issue set spans at most one height; the "null block"
  case of C&L (a gap below max-s) cannot arise.
* Checkpoints are commit certificates: the last executed block's 2f+1
  COMMITs prove it stable, so the low watermark is the executed height and
  every log entry at or below it is dropped at once. Memory stays bounded
  by O(n) entries whatever the run length.
* Validation happens before the replica's PREPARE (and so before its
  COMMIT). Validating only after "prepared" would let a Byzantine primary
  get an invalid block prepared; C&L then force every later primary to
  re-issue it, and the system would change views forever. With validation
  before PREPARE, a prepared certificate implies f+1 honest replicas found
  the block valid, so re-issued blocks are valid too.
* A replica restarted from its store (``restored_view``) may have voted in
  that view before it crashed and forgot; it does not send PRE-PREPARE,
  PREPARE, COMMIT or NEW-VIEW in any view up to ``restored_view``, so it can
  never contradict a vote it lost.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Final, Protocol

from consensus.canonical import MalformedMessage
from consensus.ledger import (
    GENESIS_HASH,
    Block,
    CommitCertificate,
    Request,
    Verify,
    check_block,
    encode_batch,
    max_faulty,
    quorum_size,
)
from consensus.messages import (
    Blocks,
    Commit,
    Fetch,
    Forward,
    Message,
    NewView,
    Prepare,
    PreparedCertificate,
    PrePrepare,
    Sign,
    ViewChange,
)

Validate = Callable[[Block], bool]
"""Application check of a proposed block (the node recomputes verdicts)."""

BROADCAST: Final = None
FETCH_BATCH: Final = 32
# How far ahead of the executed height votes are kept, so that a replica a
# few messages behind still counts votes that overtook the missing commit.
VOTE_WINDOW: Final = 2
MAX_PENDING: Final = 100_000
# VIEW-CHANGEs kept per sender (the highest views), bounding memory under spam.
VIEW_MEMORY: Final = 4


class ChainReader(Protocol):
    """What the replica reads from its block store (like raft's Storage)."""

    def height(self) -> int: ...

    def read_range(self, start: int, stop: int) -> list[Block]: ...


class CommittedBlock:
    """A committed block with the requests it executed (stale/duplicate ones skipped)."""

    __slots__ = ("block", "executed")

    def __init__(self, block: Block, executed: list[Request]) -> None:
        self.block = block
        self.executed = executed


class Ready:
    """Work handed to the caller: persist ``view`` and ``blocks`` first, then send ``messages``.

    ``messages`` holds ``(destination, message)`` pairs; destination ``None``
    means every other replica.
    """

    __slots__ = ("blocks", "committed", "messages", "view")

    def __init__(
        self,
        *,
        messages: list[tuple[int | None, Message]],
        blocks: list[Block],
        committed: list[CommittedBlock],
        view: int | None,
    ) -> None:
        self.messages = messages
        self.blocks = blocks
        self.committed = committed
        self.view = view


class Replica:
    """One PBFT replica; ids are 0..n-1 and the primary of view v is v mod n."""

    __slots__ = (
        "_abstain_through",
        "_awaiting_advance",
        "_backoff",
        "_backoff_cap",
        "_chain",
        "_commits",
        "_fetch_peer",
        "_fetch_wanted",
        "_future_pre_prepares",
        "_head_cert",
        "_last_fetch",
        "_max_batch",
        "_new_view",
        "_out_blocks",
        "_out_committed",
        "_out_messages",
        "_out_view",
        "_own_view_changes",
        "_pending",
        "_pre_prepare",
        "_prepared",
        "_prepares",
        "_reissued",
        "_sign",
        "_stable_floor",
        "_stage",
        "_staged",
        "_timeout",
        "_validate",
        "_validated",
        "_vc_deadline",
        "_vc_resend",
        "_verify",
        "_view_changes",
        "_voted",
        "_work_deadline",
        "active",
        "f",
        "head_hash",
        "height",
        "id",
        "last_timestamp",
        "n",
        "now",
        "quorum",
        "view",
    )

    def __init__(
        self,
        *,
        replica_id: int,
        n: int,
        sign: Sign,
        verify: Verify,
        validate: Validate,
        chain: ChainReader,
        restored_view: int | None = None,
        timeout: int = 20,
        backoff_cap: int = 5,
        max_batch: int = 256,
    ) -> None:
        if n < 4 or not 0 <= replica_id < n:
            raise ValueError(f"need n >= 4 and 0 <= replica_id < n, got {replica_id}/{n}")
        self.id = replica_id
        self.n = n
        self.f = max_faulty(n)
        self.quorum = quorum_size(n)
        self._sign = sign
        self._verify = verify
        self._validate = validate
        self._chain = chain
        self._timeout = timeout
        self._backoff_cap = backoff_cap
        self._max_batch = max_batch
        self.now = 0
        # A restarted replica may have voted in its persisted view and forgotten
        # it; it never votes again in that view or any earlier one.
        self.view = restored_view or 0
        self._abstain_through = -1 if restored_view is None else restored_view
        self.active = True
        # Heights at or below the new view's stable checkpoint are decided:
        # no fresh proposal for them may be voted on in this view.
        self._stable_floor = 0
        self.height = 0
        self.head_hash = GENESIS_HASH
        self._head_cert: CommitCertificate | None = None
        self.last_timestamp: dict[str, int] = {}
        self._pending: dict[tuple[str, int], Request] = {}
        self._pre_prepare: PrePrepare | None = None
        self._staged: PrePrepare | None = None
        self._stage = 0
        self._future_pre_prepares: dict[tuple[int, int], PrePrepare] = {}
        self._prepares: dict[tuple[int, int], dict[int, Prepare]] = {}
        self._commits: dict[tuple[int, int], dict[int, Commit]] = {}
        self._voted: set[tuple[int, int, int]] = set()  # (view, height, message kind)
        self._validated: dict[bytes, bool] = {}
        self._prepared: PreparedCertificate | None = None
        # VIEW-CHANGEs by (view, sender): a sender that moved on to a higher
        # view still counts towards the quorum of the lower one (C&L keep all).
        self._view_changes: dict[tuple[int, int], ViewChange] = {}
        self._own_view_changes: dict[int, ViewChange] = {}
        self._new_view: NewView | None = None
        self._reissued: set[bytes] = set()
        self._backoff = 0
        self._work_deadline: int | None = None
        self._vc_deadline: int | None = None
        self._vc_resend = 0
        self._fetch_wanted = False
        self._fetch_peer = (replica_id + 1) % n
        self._last_fetch = -(10**9)
        self._out_messages: list[tuple[int | None, Message]] = []
        self._out_blocks: list[Block] = []
        self._out_committed: list[CommittedBlock] = []
        self._out_view: int | None = None
        self._awaiting_advance = False
        self._replay_chain()

    # ------------------------------------------------------------------ API

    @property
    def primary(self) -> int:
        return self.view % self.n

    @property
    def is_primary(self) -> bool:
        return self.view % self.n == self.id

    def step(self, message: Message) -> None:
        """Handle one incoming message; unauthentic or irrelevant ones are ignored."""
        sender = message.sender
        if sender == self.id or not 0 <= sender < self.n:
            return
        if not self._verify(sender, message.signed, message.signature):
            return
        handler = _HANDLERS.get(type(message))
        if handler is not None:
            handler(self, message)
            self._progress()

    def tick(self) -> None:
        """Advance logical time by one tick: timers, retransmission, state transfer."""
        self.now += 1
        now = self.now
        if self.active:
            if self._pre_prepare is not None or self._pending:
                if self._work_deadline is None:
                    self._work_deadline = now + self._current_timeout()
                elif now >= self._work_deadline:
                    self._start_view_change(self.view + 1)
            else:
                self._work_deadline = None
        else:
            if self._vc_deadline is not None and now >= self._vc_deadline:
                self._backoff = min(self._backoff + 1, self._backoff_cap)
                self._start_view_change(self.view + 1)
            elif now >= self._vc_resend:
                # VIEW-CHANGE messages may be lost; resending is C&L's remedy.
                own = self._own_view_changes.get(self.view)
                if own is not None:
                    self._send(BROADCAST, own)
                self._vc_resend = now + self._timeout
        if self._fetch_wanted and now - self._last_fetch >= 2:
            self._send_fetch()
        self._progress()

    def propose(self, request: Request) -> None:
        """Submit a client request; the primary batches it, a backup relays and watches it."""
        if request.timestamp <= self.last_timestamp.get(request.client, -1):
            return
        if request.key in self._pending or len(self._pending) >= MAX_PENDING:
            return
        self._pending[request.key] = request
        if self.active and not self.is_primary:
            self._send(self.primary, self._signed(Forward(request=request, sender=self.id)))
        self._progress()

    def committed_pending(self) -> tuple[CommittedBlock, ...]:
        """Blocks committed since the last :meth:`ready`, in height order.

        ``validate`` for height h+1 can run inside the same ``step`` that
        executed h, before h reaches the caller in a ``Ready``; an
        application whose validity depends on the state after h applies these
        first.
        """
        return tuple(self._out_committed)

    def has_ready(self) -> bool:
        return bool(
            self._out_messages
            or self._out_blocks
            or self._out_committed
            or self._out_view is not None
        )

    def ready(self) -> Ready:
        """Hand over accumulated output; call :meth:`advance` once it is persisted and sent."""
        if self._awaiting_advance:
            raise RuntimeError("ready() called again before advance()")
        ready = Ready(
            messages=self._out_messages,
            blocks=self._out_blocks,
            committed=self._out_committed,
            view=self._out_view,
        )
        self._out_messages, self._out_blocks, self._out_committed = [], [], []
        self._out_view = None
        self._awaiting_advance = True
        return ready

    def advance(self) -> None:
        """Acknowledge the last :class:`Ready` (persisted and sent)."""
        self._awaiting_advance = False

    def log_size(self) -> int:
        """Number of stored protocol entries (for memory-bound tests)."""
        votes = sum(len(v) for v in self._prepares.values()) + sum(
            len(v) for v in self._commits.values()
        )
        return (
            votes
            + len(self._future_pre_prepares)
            + len(self._voted)
            + len(self._validated)
            + len(self._view_changes)
            + len(self._reissued)
            + (self._pre_prepare is not None)
            + (self._prepared is not None)
        )

    @property
    def pending_count(self) -> int:
        return len(self._pending)

    def is_pending(self, key: tuple[str, int]) -> bool:
        """Whether a request with this (client, timestamp) waits in the pool, not yet executed."""
        return key in self._pending

    # -------------------------------------------------------------- helpers

    def _current_timeout(self) -> int:
        return self._timeout << self._backoff

    def _may_vote(self) -> bool:
        return self.view > self._abstain_through

    def _signed(self, message: Message) -> Message:
        message.signature = self._sign(message.signed)
        return message

    def _send(self, destination: int | None, message: Message) -> None:
        self._out_messages.append((destination, message))

    def _replay_chain(self) -> None:
        """Rebuild head and replicated request state from the persisted chain."""
        top = self._chain.height()
        start = 1
        while start <= top:
            for block in self._chain.read_range(start, min(top + 1, start + 256)):
                self._execute_requests(block)
                self.height = block.height
                self.head_hash = block.digest
                self._head_cert = block.certificate
            start += 256

    def _hint_behind(self, peer: int) -> None:
        """Someone is ahead of us (height or view): fetch certified blocks from them."""
        self._fetch_peer = peer
        if not self._fetch_wanted:
            self._fetch_wanted = True
            if self.now - self._last_fetch >= 2:
                self._send_fetch()

    def _send_fetch(self) -> None:
        self._last_fetch = self.now
        self._fetch_wanted = False
        message = self._signed(Fetch(from_height=self.height + 1, sender=self.id))
        self._send(self._fetch_peer, message)

    # ----------------------------------------------------------- normal case

    def _on_pre_prepare(self, message: PrePrepare) -> None:
        if message.height <= self.height:
            return
        if message.view != self.view:
            # Peers in another view that are ahead still hold certified blocks.
            if message.view > self.view or message.height > self.height + 1:
                self._hint_behind(message.sender)
            return
        if message.sender != message.view % self.n:
            return
        if message.height > self.height + VOTE_WINDOW:
            self._hint_behind(message.sender)
            return
        key = (message.view, message.height)
        if not self.active or message.height > self.height + 1:
            if message.height > self.height + 1:
                self._hint_behind(message.sender)
            self._future_pre_prepares.setdefault(key, message)
            return
        if self._pre_prepare is None:
            self._pre_prepare = message

    def _on_vote(self, message: Prepare | Commit, store: dict[tuple[int, int], dict]) -> None:
        height = message.height
        if height <= self.height:
            return
        if message.view != self.view:
            if message.view > self.view or height > self.height + 1:
                self._hint_behind(message.sender)
            return
        if height > self.height + 1:
            self._hint_behind(message.sender)
            if height > self.height + VOTE_WINDOW:
                return
        votes = store.setdefault((message.view, height), {})
        # First vote per signer wins: a double vote never counts twice.
        votes.setdefault(message.sender, message)

    def _on_prepare(self, message: Prepare) -> None:
        if message.sender != message.view % self.n:
            self._on_vote(message, self._prepares)

    def _on_commit(self, message: Commit) -> None:
        self._on_vote(message, self._commits)

    def _on_forward(self, message: Forward) -> None:
        request = message.request
        fresh = request.timestamp > self.last_timestamp.get(request.client, -1)
        if fresh and len(self._pending) < MAX_PENDING:
            self._pending.setdefault(request.key, request)

    def _progress(self) -> None:
        """Drive the one block in flight as far as the collected votes allow."""
        while self.active:
            pre = self._pre_prepare
            if pre is None:
                pre = self._future_pre_prepares.pop((self.view, self.height + 1), None)
                if pre is None:
                    self._maybe_propose()
                    return
                self._pre_prepare = pre
            # Stage of this PRE-PREPARE: 0 new, 1 PREPARE sent, 2 prepared and
            # COMMIT sent. Remembering it keeps each message O(1) in the hot path.
            if self._staged is not pre:
                self._staged = pre
                self._stage = 0
            if self._stage == 0:
                if not self._vote_prepare(pre):
                    return
                self._stage = 1
            if self._stage == 1:
                if not self._vote_commit(pre):
                    return
                self._stage = 2
            if not self._commit_if_quorum(pre):
                return

    def _block_is_valid(self, pre: PrePrepare) -> bool:
        digest = pre.digest
        cached = self._validated.get(digest)
        if cached is not None:
            return cached
        block = pre.block
        header = block.header
        ok = (
            header.height == self.height + 1
            and header.height > self._stable_floor
            and header.previous_hash == self.head_hash
            and (
                (header.view == pre.view and header.proposer == pre.sender)
                or (header.view < pre.view and digest in self._reissued)
            )
            and block.payload_matches()
        )
        if ok:
            try:
                block.requests()
            except MalformedMessage:
                ok = False
        if ok and header.proposer != self.id:
            ok = bool(self._validate(block))
        self._validated[digest] = ok
        return ok

    def _vote_prepare(self, pre: PrePrepare) -> bool:
        """Validate the proposal and PREPARE it; False when nothing more can happen now."""
        if not self._block_is_valid(pre):
            # An invalid proposal is evidence against the primary: change view.
            self._start_view_change(self.view + 1)
            return False
        key = (pre.view, pre.height, Prepare.KIND)
        if pre.sender != self.id and key not in self._voted and self._may_vote():
            self._voted.add(key)
            prepare = self._signed(
                Prepare(view=pre.view, height=pre.height, digest=pre.digest, sender=self.id)
            )
            self._prepares.setdefault((pre.view, pre.height), {})[self.id] = prepare
            self._send(BROADCAST, prepare)
        return True

    def _matching(self, votes: dict[int, Message] | None, digest: bytes) -> list[Message]:
        if not votes:
            return []
        return [vote for vote in votes.values() if vote.digest == digest]  # type: ignore[attr-defined]

    def _vote_commit(self, pre: PrePrepare) -> bool:
        prepares = self._matching(self._prepares.get((pre.view, pre.height)), pre.digest)
        if len(prepares) < 2 * self.f:
            return False
        prepared = self._prepared
        if prepared is None or prepared.height != pre.height or prepared.view < pre.view:
            self._prepared = PreparedCertificate(pre, prepares[: 2 * self.f])  # type: ignore[arg-type]
        key = (pre.view, pre.height, Commit.KIND)
        if key not in self._voted and self._may_vote():
            self._voted.add(key)
            commit = self._signed(
                Commit(view=pre.view, height=pre.height, digest=pre.digest, sender=self.id)
            )
            self._commits.setdefault((pre.view, pre.height), {})[self.id] = commit
            self._send(BROADCAST, commit)
        return True

    def _commit_if_quorum(self, pre: PrePrepare) -> bool:
        commits = self._matching(self._commits.get((pre.view, pre.height)), pre.digest)
        if len(commits) < self.quorum:
            return False
        commits.sort(key=lambda vote: vote.sender)
        certificate = CommitCertificate(
            view=pre.view,
            height=pre.height,
            digest=pre.digest,
            signatures=[(vote.sender, vote.signature) for vote in commits[: self.quorum]],
        )
        self._execute(pre.block.with_certificate(certificate))
        self._backoff = 0
        return True

    def _execute_requests(self, block: Block) -> list[Request]:
        executed = []
        last = self.last_timestamp
        pending = self._pending
        for request in block.requests():
            if request.timestamp > last.get(request.client, -1):
                last[request.client] = request.timestamp
                executed.append(request)
            pending.pop(request.key, None)
        return executed

    def _execute(self, block: Block) -> None:
        """Apply a committed, certified block and drop all log entries at or below it."""
        executed = self._execute_requests(block)
        height = block.height
        self.height = height
        self.head_hash = block.digest
        self._head_cert = block.certificate
        self._out_blocks.append(block)
        self._out_committed.append(CommittedBlock(block, executed))
        self._pre_prepare = None
        self._work_deadline = None
        self._validated.clear()
        if self._prepared is not None and self._prepared.height <= height:
            self._prepared = None
        for log in (self._prepares, self._commits, self._future_pre_prepares):
            if log:
                for key in [key for key in log if key[1] <= height]:
                    del log[key]
        if self._voted:
            self._voted = {key for key in self._voted if key[1] > height}

    def _maybe_propose(self) -> None:
        if not (self.active and self.is_primary and self._pending and self._may_vote()):
            return
        height = self.height + 1
        if height <= self._stable_floor:
            return  # still fetching decided blocks
        if (self.view, height, PrePrepare.KIND) in self._voted:
            return
        block = self._valid_block(height, self._take_batch())
        if block is None:
            return
        pre = self._signed(PrePrepare(view=self.view, height=height, block=block, sender=self.id))
        self._voted.add((self.view, height, PrePrepare.KIND))
        self._validated[block.digest] = True
        self._pre_prepare = pre  # type: ignore[assignment]
        self._send(BROADCAST, pre)
        # The primary's PRE-PREPARE stands for its own PREPARE; its COMMIT
        # follows once 2f backups prepared, via _progress.

    def _block_of(self, height: int, batch: list[Request]) -> Block:
        return Block.propose(
            height=height,
            previous_hash=self.head_hash,
            view=self.view,
            proposer=self.id,
            payload=encode_batch(batch),
        )

    def _valid_block(self, height: int, batch: list[Request]) -> Block | None:
        """The block to propose, after the application's own check.

        An honest primary must not propose what its backups will reject, or
        every view would fail on the same request: requests that fail on
        their own are dropped from the pool.
        """
        if not batch:
            return None
        block = self._block_of(height, batch)
        if self._validate(block):
            return block
        kept = []
        for request in batch:
            if self._validate(self._block_of(height, [request])):
                kept.append(request)
            else:
                del self._pending[request.key]
        block = self._block_of(height, kept)
        return block if kept and self._validate(block) else None

    def _take_batch(self) -> list[Request]:
        last = self.last_timestamp
        stale = [key for key, req in self._pending.items() if req.timestamp <= last.get(key[0], -1)]
        for key in stale:
            del self._pending[key]
        batch = []
        for request in self._pending.values():
            batch.append(request)
            if len(batch) >= self._max_batch:
                break
        # Canonical order inside the block: by client, then timestamp.
        batch.sort(key=lambda request: (request.client, request.timestamp))
        return batch

    # ----------------------------------------------------------- view change

    def _start_view_change(self, new_view: int) -> None:
        if new_view <= self.view:
            return
        self.view = new_view
        self.active = False
        self._out_view = new_view
        self._pre_prepare = None
        self._work_deadline = None
        self._vc_deadline = None
        self._vc_resend = self.now + self._timeout
        self._reissued = set()
        self._drop_votes_below(new_view)
        prepared = self._prepared
        certs = [prepared] if prepared is not None and prepared.height == self.height + 1 else []
        view_change = self._signed(
            ViewChange(
                new_view=new_view,
                checkpoint_height=self.height,
                checkpoint_digest=self.head_hash,
                checkpoint=self._head_cert,
                prepared=certs,
                sender=self.id,
            )
        )
        self._view_changes[(new_view, self.id)] = view_change  # type: ignore[assignment]
        self._own_view_changes[new_view] = view_change  # type: ignore[assignment]
        for old in [v for v in self._own_view_changes if v < new_view - VIEW_MEMORY]:
            del self._own_view_changes[old]
        self._send(BROADCAST, view_change)
        self._after_view_change_vote()

    def _drop_votes_below(self, view: int) -> None:
        for log in (self._prepares, self._commits, self._future_pre_prepares):
            for key in [key for key in log if key[0] < view]:
                del log[key]
        self._voted = {key for key in self._voted if key[0] >= view}
        self._validated.clear()

    def _on_view_change(self, message: ViewChange) -> None:
        view = message.new_view
        if view < self.view or (view == self.view and self.active):
            self._help_straggler(message)
            return
        key = (view, message.sender)
        if key in self._view_changes:
            return
        if not message.is_valid(verify=self._verify, n=self.n, f=self.f):
            return
        self._view_changes[key] = message
        views = sorted(v for v, sender in self._view_changes if sender == message.sender)
        for old in views[:-VIEW_MEMORY]:
            del self._view_changes[(old, message.sender)]
        if message.checkpoint_height > self.height:
            self._hint_behind(message.sender)
        self._join_if_f_plus_one()
        self._after_view_change_vote()

    def _help_straggler(self, message: ViewChange) -> None:
        """Retransmit what a replica stuck in a lower view change is missing.

        C&L's implementation retransmits lost VIEW-CHANGE and NEW-VIEW messages
        on demand; without it, a replica whose copy was dropped can wait forever.
        """
        new_view = self._new_view
        if new_view is not None and new_view.view >= message.new_view:
            self._send(message.sender, new_view)
            return
        own = self._own_view_changes.get(message.new_view)
        if own is not None:
            self._send(message.sender, own)
        latest = self._own_view_changes.get(self.view)
        if latest is not None and latest is not own:
            self._send(message.sender, latest)

    def _join_if_f_plus_one(self) -> None:
        """C&L liveness rule: f+1 replicas asking for higher views cannot all be faulty."""
        highest: dict[int, int] = {}
        for view, sender in self._view_changes:
            if sender != self.id and view > self.view:
                highest[sender] = max(view, highest.get(sender, 0))
        if len(highest) >= self.f + 1:
            views = sorted(highest.values())
            self._start_view_change(views[-(self.f + 1)])

    def _collected_view_changes(self) -> list[ViewChange]:
        return sorted(
            (vc for (view, _), vc in self._view_changes.items() if view == self.view),
            key=lambda vc: vc.sender,
        )

    def _after_view_change_vote(self) -> None:
        if self.active:
            return
        collected = self._collected_view_changes()
        if len(collected) < self.quorum:
            return
        if self._vc_deadline is None:
            # C&L: the timer starts once 2f+1 VIEW-CHANGEs are in; if NEW-VIEW
            # does not follow in time, move on with a doubled timeout.
            self._vc_deadline = self.now + self._current_timeout()
        if self.is_primary and self._may_vote():
            self._send_new_view(collected[: self.quorum])

    def _reissue_set(self, view_changes: Sequence[ViewChange]) -> tuple[int, list[Block]]:
        """C&L's O set: for each height above the highest stable checkpoint, the
        block prepared in the highest view. With one block in flight that is at
        most one height, and only when a certificate exists (no null blocks)."""
        checkpoint = max(vc.checkpoint_height for vc in view_changes)
        best: PreparedCertificate | None = None
        for vc in view_changes:
            for cert in vc.prepared:
                if cert.height != checkpoint + 1:
                    continue
                if (
                    best is None
                    or cert.view > best.view
                    or (cert.view == best.view and cert.digest < best.digest)
                ):
                    best = cert
        return checkpoint, ([best.pre_prepare.block] if best is not None else [])

    def _send_new_view(self, view_changes: list[ViewChange]) -> None:
        _, blocks = self._reissue_set(view_changes)
        pre_prepares = [
            self._signed(
                PrePrepare(
                    view=self.view,
                    height=block.height,
                    block=Block(block.header, block.payload),
                    sender=self.id,
                )
            )
            for block in blocks
        ]
        new_view = self._signed(
            NewView(
                view=self.view,
                view_changes=view_changes,
                pre_prepares=pre_prepares,  # type: ignore[arg-type]
                sender=self.id,
            )
        )
        self._send(BROADCAST, new_view)
        self._enter_view(new_view)  # type: ignore[arg-type]

    def _on_new_view(self, message: NewView) -> None:
        view = message.view
        if view < self.view or (view == self.view and self.active):
            return
        if message.sender != view % self.n:
            return
        senders = set()
        for vc in message.view_changes:
            if vc.new_view != view or vc.sender in senders or not 0 <= vc.sender < self.n:
                return
            if not vc.is_authentic(self._verify):
                return
            if not vc.is_valid(verify=self._verify, n=self.n, f=self.f):
                return
            senders.add(vc.sender)
        if len(senders) < self.quorum:
            return
        for pre in message.pre_prepares:
            if pre.view != view or pre.sender != message.sender:
                return
            if not pre.is_authentic(self._verify):
                return
        # Recompute the re-issue set ourselves; a primary that deviates is faulty.
        _, expected = self._reissue_set(message.view_changes)
        actual = [(pre.height, pre.digest) for pre in message.pre_prepares]
        if actual != [(block.height, block.digest) for block in expected]:
            self._start_view_change(view + 1)
            return
        self._enter_view(message)

    def _enter_view(self, new_view: NewView) -> None:
        if new_view.view != self.view:
            self._out_view = new_view.view
        self.view = new_view.view
        self.active = True
        self._new_view = new_view
        self._vc_deadline = None
        self._work_deadline = None
        self._drop_votes_below(new_view.view)
        self._view_changes = {
            key: vc for key, vc in self._view_changes.items() if key[0] > new_view.view
        }
        self._reissued = {pre.digest for pre in new_view.pre_prepares}
        checkpoint = max(vc.checkpoint_height for vc in new_view.view_changes)
        self._stable_floor = checkpoint
        if checkpoint > self.height:
            self._hint_behind(new_view.sender)
        self._pre_prepare = None
        for pre in new_view.pre_prepares:
            if pre.height == self.height + 1:
                self._pre_prepare = pre
            elif pre.height > self.height + 1:
                self._future_pre_prepares[(pre.view, pre.height)] = pre
        if self._pre_prepare is not None and self.is_primary:
            self._voted.add((self.view, self._pre_prepare.height, PrePrepare.KIND))
        if not self.is_primary and self._may_vote():
            # The new primary may never have seen what we hold (C&L have the
            # client retransmit); relay it rather than time out again.
            for count, request in enumerate(self._pending.values()):
                if count >= self._max_batch:
                    break
                self._send(self.primary, self._signed(Forward(request=request, sender=self.id)))

    # -------------------------------------------------------- state transfer

    def _on_fetch(self, message: Fetch) -> None:
        start = message.from_height
        top = self._chain.height()
        blocks = (
            self._chain.read_range(start, min(top + 1, start + FETCH_BATCH)) if start <= top else []
        )
        new_view = self._new_view if self.active else None
        if blocks or new_view is not None:
            reply = Blocks(blocks=blocks, new_view=new_view, sender=self.id)
            self._send(message.sender, self._signed(reply))

    def _on_blocks(self, message: Blocks) -> None:
        applied = 0
        for block in message.blocks:
            if block.height <= self.height:
                continue
            reason = check_block(
                block,
                previous_hash=self.head_hash,
                height=self.height + 1,
                verify=self._verify,
                n=self.n,
            )
            if reason:
                break
            try:
                block.requests()
            except MalformedMessage:
                break
            # A certified block was validated by at least f+1 honest replicas.
            self._execute(block)
            applied += 1
        new_view = message.new_view
        if new_view is not None and new_view.is_authentic(self._verify):
            self._on_new_view(new_view)
        if applied and len(message.blocks) >= FETCH_BATCH:
            self._fetch_peer = message.sender
            self._send_fetch()


_HANDLERS: Final[dict[type, Callable[[Replica, Message], None]]] = {
    PrePrepare: Replica._on_pre_prepare,  # type: ignore[dict-item]
    Prepare: Replica._on_prepare,  # type: ignore[dict-item]
    Commit: Replica._on_commit,  # type: ignore[dict-item]
    ViewChange: Replica._on_view_change,  # type: ignore[dict-item]
    NewView: Replica._on_new_view,  # type: ignore[dict-item]
    Fetch: Replica._on_fetch,  # type: ignore[dict-item]
    Blocks: Replica._on_blocks,  # type: ignore[dict-item]
    Forward: Replica._on_forward,  # type: ignore[dict-item]
}
