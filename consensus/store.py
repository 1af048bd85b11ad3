"""Block stores: SQLite on disk for nodes, an in-memory twin for the simulator.

Committed blocks are the only thing a replica must never lose, so the
SQLite store runs in WAL mode with ``synchronous=FULL``: ``append`` returns
only after the block is durable. Reopening re-verifies the whole chain with
:func:`~consensus.ledger.verify_chain` (links, payload digests, commit
certificates) and truncates to the verified prefix, reporting what it
dropped in :attr:`BlockStore.verdict`. The replica then fetches anything
missing from its peers (state transfer, Castro & Liskov TOCS 2002 s.6).

Both stores also keep the replica's current view (raft's "hard state"), so
a restarted replica knows which views it may already have voted in.

A write that fails (a full disk: SQLite's ``SQLITE_FULL``, "database or disk
is full") changes nothing: the transaction is rolled back, the head stays
where it was, and the error reaches the caller (the miner turns read-only,
``node.full_disk``). Opening a store on a full disk, or with an I/O error,
fails the same way: only a file SQLite finds damaged is set aside.
"""

from __future__ import annotations

import os
import sqlite3
from typing import Final

from consensus.canonical import MalformedMessage
from consensus.ledger import GENESIS_HASH, Block, ChainVerdict, Verify, verify_chain

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS blocks (
    height INTEGER PRIMARY KEY,
    digest BLOB NOT NULL,
    data BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS hard_state (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""


# SQLite's result codes for a full disk (sqlite3.SQLITE_FULL from Python 3.11 on):
# "database or disk is full", and the shared-memory file of a WAL database
# that cannot grow, which is what opening one on a full disk reports.
SQLITE_FULL: Final = 13
SQLITE_IOERR: Final = 10
SQLITE_IOERR_SHMSIZE: Final = 4874
FULL_CODES: Final = frozenset({SQLITE_FULL, SQLITE_IOERR_SHMSIZE})
FULL_MESSAGE: Final = "database or disk is full"


def is_full(exc: BaseException) -> bool:
    """SQLite could not write for want of space (its error code; its message before 3.11)."""
    return isinstance(exc, sqlite3.Error) and (
        getattr(exc, "sqlite_errorcode", None) in FULL_CODES or str(exc) == FULL_MESSAGE
    )


def _says_nothing_of_the_file(exc: sqlite3.Error) -> bool:
    """A full disk or an I/O error (SQLITE_IOERR and its extended codes): the device
    failed, which says nothing of the file, so setting it aside would not help."""
    code = getattr(exc, "sqlite_errorcode", None)
    io_error = code is not None and code & 0xFF == SQLITE_IOERR
    return is_full(exc) or io_error or str(exc) == "disk I/O error"


class StoreError(RuntimeError):
    """A block that does not extend the stored head, or a store used after close."""


class MemoryBlockStore:
    """In-memory store with the same API as :class:`BlockStore` (simulator, tests)."""

    __slots__ = ("_blocks", "_view")

    def __init__(self) -> None:
        self._blocks: list[Block] = []
        self._view: int | None = None

    def height(self) -> int:
        return len(self._blocks)

    def head(self) -> Block | None:
        return self._blocks[-1] if self._blocks else None

    def append(self, block: Block) -> None:
        _check_extends(self.head(), block)
        self._blocks.append(block)

    def read_range(self, start: int, stop: int) -> list[Block]:
        """Blocks with start <= height < stop."""
        return self._blocks[max(start, 1) - 1 : max(stop, 1) - 1]

    def save_view(self, view: int) -> None:
        self._view = view

    def load_view(self) -> int | None:
        return self._view

    def truncate(self, height: int) -> None:
        """Drop blocks above ``height`` (tests use this to model a lost write)."""
        del self._blocks[height:]

    def close(self) -> None:
        pass


def _check_extends(head: Block | None, block: Block) -> None:
    expected_height = head.height + 1 if head is not None else 1
    expected_previous = head.digest if head is not None else GENESIS_HASH
    if block.height != expected_height or block.header.previous_hash != expected_previous:
        raise StoreError(
            f"block at height {block.height} does not extend the head at {expected_height - 1}"
        )
    if block.certificate is None:
        raise StoreError(f"block at height {block.height} has no commit certificate")


def _set_aside(path: str) -> str:
    """Rename ``path`` (and its -wal and -shm files) to the first free ``path.corrupt-<k>``."""
    k = 1
    while any(os.path.exists(f"{path}.corrupt-{k}{suffix}") for suffix in ("", "-wal", "-shm")):
        k += 1
    target = f"{path}.corrupt-{k}"
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.replace(path + suffix, target + suffix)
    return target


class BlockStore:
    """SQLite block store (WAL, synchronous=FULL); verifies and truncates on open.

    A file SQLite cannot read (truncated, overwritten, not a database) is
    set aside, never deleted: it and its WAL are renamed to
    ``<path>.corrupt-<k>`` (:attr:`set_aside`), and the store starts empty,
    so the replica re-fetches the chain from its peers, checking every
    block's commit certificate.
    """

    __slots__ = ("_conn", "_head", "path", "set_aside", "verdict")

    def __init__(self, path: str | os.PathLike[str], *, verify: Verify, n: int) -> None:
        self.path = os.fspath(path)
        self._conn: sqlite3.Connection | None = None
        self.set_aside: str | None = None
        try:
            self._open(verify=verify, n=n)
        except sqlite3.DatabaseError as exc:
            self.close()
            if _says_nothing_of_the_file(exc):  # not a damaged file: nothing to set aside
                raise
            self.set_aside = _set_aside(self.path)
            self._open(verify=verify, n=n)
            self.verdict = ChainVerdict(
                verified=0,
                first_bad_height=1,
                reason=f"unreadable store ({exc}); moved to {self.set_aside}",
            )

    def _open(self, *, verify: Verify, n: int) -> None:
        self._conn = sqlite3.connect(self.path, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        problems = [row[0] for row in self._conn.execute("PRAGMA quick_check").fetchall()]
        if problems != ["ok"]:
            raise sqlite3.DatabaseError("; ".join(str(p) for p in problems[:3]))
        self._conn.executescript(_SCHEMA)
        self.verdict = self._recover(verify=verify, n=n)
        self._head = self._read_head()

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError("block store is closed")
        return self._conn

    def _recover(self, *, verify: Verify, n: int) -> ChainVerdict:
        db = self._db()
        rows = db.execute(
            "SELECT height, CAST(data AS BLOB) FROM blocks ORDER BY height"
        ).fetchall()
        blocks: list[Block] = []
        decode_failure: int | None = None
        for height, data in rows:
            try:
                blocks.append(Block.decode(data))
            except MalformedMessage:
                decode_failure = height
                break
        verdict = verify_chain(blocks, verify=verify, n=n)
        if verdict.ok and decode_failure is not None:
            verdict = ChainVerdict(
                verified=verdict.verified,
                first_bad_height=decode_failure,
                reason="stored bytes do not decode",
            )
        if not verdict.ok or len(rows) != verdict.verified:
            db.execute("BEGIN IMMEDIATE")
            db.execute("DELETE FROM blocks WHERE height > ?", (verdict.verified,))
            db.execute("COMMIT")
        return verdict

    def _read_head(self) -> Block | None:
        row = self._db().execute("SELECT data FROM blocks ORDER BY height DESC LIMIT 1").fetchone()
        return Block.decode(row[0]) if row else None

    def height(self) -> int:
        return self._head.height if self._head is not None else 0

    def head(self) -> Block | None:
        return self._head

    def append(self, block: Block) -> None:
        """Durably append a certified block that extends the head."""
        _check_extends(self._head, block)
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute(
                "INSERT INTO blocks (height, digest, data) VALUES (?, ?, ?)",
                (block.height, block.digest, block.encode()),
            )
            db.execute("COMMIT")
        except BaseException:
            # SQLite rolls back by itself after some errors (SQLITE_FULL among
            # them); a second ROLLBACK would fail and hide the first error.
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        self._head = block

    def read_range(self, start: int, stop: int) -> list[Block]:
        """Blocks with start <= height < stop."""
        rows = self._db().execute(
            "SELECT data FROM blocks WHERE height >= ? AND height < ? ORDER BY height",
            (start, stop),
        )
        return [Block.decode(data) for (data,) in rows]

    def save_view(self, view: int) -> None:
        self._db().execute(
            "INSERT INTO hard_state (name, value) VALUES ('view', ?) "
            "ON CONFLICT(name) DO UPDATE SET value = excluded.value",
            (view,),
        )

    def load_view(self) -> int | None:
        row = self._db().execute("SELECT value FROM hard_state WHERE name = 'view'").fetchone()
        return int(row[0]) if row else None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
