"""SQLite block store: append discipline, durable reopen, recovery to a verified prefix."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from consensus.ledger import Block, Request, encode_batch
from consensus.store import BlockStore, MemoryBlockStore, StoreError
from consensus.store import is_full as store_is_full

from .chain_fixtures import N, certify, keyring, make_chain

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("kind", ["sqlite", "memory"])
def test_append_read_and_head(tmp_path: Path, kind: str) -> None:
    keys = keyring()
    chain = make_chain(5, keys)
    store = (
        BlockStore(tmp_path / "c.db", verify=keys.verify, n=N)
        if kind == "sqlite"
        else MemoryBlockStore()
    )
    for block in chain:
        store.append(block)
    assert store.height() == 5
    assert store.head() is not None and store.head().digest == chain[-1].digest  # type: ignore[union-attr]
    assert [b.height for b in store.read_range(2, 4)] == [2, 3]
    store.close()


@pytest.mark.parametrize("kind", ["sqlite", "memory"])
def test_append_refuses_block_that_does_not_extend_head(tmp_path: Path, kind: str) -> None:
    keys = keyring()
    chain = make_chain(3, keys)
    store = (
        BlockStore(tmp_path / "c.db", verify=keys.verify, n=N)
        if kind == "sqlite"
        else MemoryBlockStore()
    )
    store.append(chain[0])
    with pytest.raises(StoreError):
        store.append(chain[2])
    store.close()


def test_reopen_restores_chain_and_view(tmp_path: Path) -> None:
    keys = keyring()
    store = BlockStore(tmp_path / "c.db", verify=keys.verify, n=N)
    for block in make_chain(4, keys):
        store.append(block)
    store.save_view(7)
    store.close()
    reopened = BlockStore(tmp_path / "c.db", verify=keys.verify, n=N)
    assert (reopened.height(), reopened.load_view(), reopened.verdict.ok) == (4, 7, True)
    reopened.close()


def test_reopen_truncates_to_verified_prefix_after_corruption(tmp_path: Path) -> None:
    keys = keyring()
    store = BlockStore(tmp_path / "c.db", verify=keys.verify, n=N)
    for block in make_chain(6, keys):
        store.append(block)
    store.close()
    with sqlite3.connect(tmp_path / "c.db") as db:
        (data,) = db.execute("SELECT data FROM blocks WHERE height = 4").fetchone()
        flipped = bytes([data[0] ^ 1]) + data[1:]
        db.execute("UPDATE blocks SET data = ? WHERE height = 4", (flipped,))
    reopened = BlockStore(tmp_path / "c.db", verify=keys.verify, n=N)
    assert reopened.verdict.first_bad_height == 4
    assert reopened.height() == 3
    reopened.close()


_WRITER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {root!r})
    sys.path.insert(0, {tests!r})
    from chain_fixtures import N, keyring, make_chain
    from consensus.store import BlockStore
    keys = keyring()
    store = BlockStore({path!r}, verify=keys.verify, n=N)
    for block in make_chain(400, keys):
        store.append(block)
        if block.height == 20:
            print("ready", flush=True)
    print("done", flush=True)
    """
)


def test_store_survives_sigkill_mid_append(tmp_path: Path) -> None:
    # Prepare: a child process appends blocks durably; we kill it mid-stream.
    path = tmp_path / "c.db"
    script = _WRITER.format(root=str(ROOT), tests=str(Path(__file__).parent), path=str(path))
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    # Execute
    assert child.stdout is not None and child.stdout.readline().strip() == "ready"
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    keys = keyring()
    reopened = BlockStore(path, verify=keys.verify, n=N)
    # Assert: whatever was durable is a verified prefix of the chain.
    assert reopened.verdict.ok
    assert reopened.height() >= 20
    expected = make_chain(reopened.height(), keys)
    assert [b.digest for b in reopened.read_range(1, reopened.height() + 1)] == [
        b.digest for b in expected
    ]
    reopened.close()


def test_store_reopens_to_verified_prefix_after_wal_truncation(tmp_path: Path) -> None:
    # Prepare: blocks live only in the WAL (no checkpoint), then the WAL is cut.
    keys = keyring()
    path = tmp_path / "c.db"
    store = BlockStore(path, verify=keys.verify, n=N)
    store._db().execute("PRAGMA wal_autocheckpoint=0")
    for block in make_chain(30, keys):
        store.append(block)
    wal = Path(str(path) + "-wal")
    size = wal.stat().st_size
    # Copy the files aside as a crashed process would leave them (no clean close).
    crashed = tmp_path / "crashed.db"
    crashed.write_bytes(path.read_bytes())
    Path(str(crashed) + "-wal").write_bytes(wal.read_bytes()[: size * 2 // 3])
    store.close()
    # Execute
    reopened = BlockStore(crashed, verify=keys.verify, n=N)
    # Assert
    assert reopened.verdict.ok
    assert 0 < reopened.height() < 30
    assert reopened.read_range(1, 2)[0].digest == make_chain(1, keys)[0].digest
    reopened.close()


def _stored_chain(path: Path, blocks: int) -> None:
    keys = keyring()
    store = BlockStore(path, verify=keys.verify, n=N)
    for block in make_chain(blocks, keys):
        store.append(block)
    store.close()


@pytest.mark.parametrize(
    "damage",
    ["truncated", "random middle", "not a database"],
)
def test_an_unreadable_store_is_set_aside_and_the_store_starts_empty(
    tmp_path: Path, damage: str
) -> None:
    # Prepare: a 40-block chain, then the file damaged
    path = tmp_path / "chain.db"
    _stored_chain(path, 40)
    data = path.read_bytes()
    if damage == "truncated":
        damaged = data[: len(data) // 3 + 100]
    elif damage == "random middle":
        middle = len(data) // 2
        damaged = data[:middle] + os.urandom(8192) + data[middle + 8192 :]
    else:
        damaged = b"this is not SQLite" * 1000
    path.write_bytes(damaged)
    # Execute
    store = BlockStore(path, verify=keyring().verify, n=N)
    # Assert: set aside (kept, not deleted), and the store starts empty
    assert store.set_aside == f"{path}.corrupt-1"
    assert Path(store.set_aside).read_bytes() == damaged
    assert store.height() == 0 and not store.verdict.ok
    assert store.set_aside in store.verdict.reason
    # Assert: the new store works
    keys = keyring()
    for block in make_chain(store.height() + 2, keys)[store.height() :]:
        store.append(block)
    store.close()


def test_a_store_that_is_not_a_database_is_set_aside_again_without_overwriting(
    tmp_path: Path,
) -> None:
    # Prepare: an earlier corrupt copy is already set aside
    path = tmp_path / "chain.db"
    (tmp_path / "chain.db.corrupt-1").write_bytes(b"earlier")
    path.write_bytes(b"garbage" * 4096)
    # Execute
    store = BlockStore(path, verify=keyring().verify, n=N)
    # Assert
    assert store.set_aside == f"{path}.corrupt-2"
    assert (tmp_path / "chain.db.corrupt-1").read_bytes() == b"earlier"
    assert (tmp_path / "chain.db.corrupt-2").read_bytes() == b"garbage" * 4096
    assert store.height() == 0
    store.close()


def _limit_growth(store: BlockStore, *, extra_pages: int = 0) -> None:
    """Let the store's database grow by at most ``extra_pages`` pages: past that,
    SQLite answers SQLITE_FULL ("database or disk is full") as on a full disk."""
    db = store._db()
    (pages,) = db.execute("PRAGMA page_count").fetchone()
    db.execute(f"PRAGMA max_page_count = {pages + extra_pages}")


def test_an_append_on_a_full_disk_changes_nothing_and_the_next_one_fits(tmp_path: Path) -> None:
    # Prepare: three blocks stored, then no room for a fourth (blocks of 3 KiB, 4 KiB pages)
    keys = keyring()
    chain = make_chain(4, keys)
    chain[3] = certify(
        Block.propose(
            height=4,
            previous_hash=chain[2].digest,
            view=0,
            proposer=0,
            payload=encode_batch([Request("alice", 4, os.urandom(12_000), b"")]),
        ),
        keys,
    )
    store = BlockStore(tmp_path / "c.db", verify=keys.verify, n=N)
    for block in chain[:3]:
        store.append(block)
    _limit_growth(store)
    # Execute
    with pytest.raises(sqlite3.OperationalError) as info:
        store.append(chain[3])
    # Assert: SQLite's own error reaches the caller (not a failed ROLLBACK), the
    # head has not moved, and nothing of block 4 is stored
    assert store_is_full(info.value), info.value
    assert store.height() == 3 and store.head() == chain[2]
    assert [b.height for b in store.read_range(1, 10)] == [1, 2, 3]
    # Execute: room again
    _limit_growth(store, extra_pages=1_000)
    store.append(chain[3])
    store.close()
    # Assert: the same store takes the block, and a reopened one verifies all four
    reopened = BlockStore(tmp_path / "c.db", verify=keys.verify, n=N)
    assert (reopened.height(), reopened.verdict.ok) == (4, True)
    reopened.close()


def test_a_full_disk_while_opening_sets_nothing_aside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a healthy chain; opening it meets a full disk
    path = tmp_path / "chain.db"
    _stored_chain(path, 3)

    def full(self: BlockStore, *, verify: object, n: int) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(BlockStore, "_open", full)
    # Execute
    with pytest.raises(sqlite3.OperationalError):
        BlockStore(path, verify=keyring().verify, n=N)
    # Assert: the chain is where it was, and nothing is marked corrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chain.db"]
    monkeypatch.undo()
    store = BlockStore(path, verify=keyring().verify, n=N)
    assert (store.height(), store.set_aside) == (3, None)
    store.close()
