"""What a node does when its disk fills: it turns read-only, says so once, and recovers.

A write that fails for want of space (``node.durable.is_disk_full``: ENOSPC,
EDQUOT, SQLite's "database or disk is full") never crashes a node and never
leaves anything half-written (every write is whole or nothing: the temporary
file and rename of ``node.durable``, SQLite's transactions). The node enters
read-only mode instead:

* it logs one error line naming the write that failed and the directories
  it writes to; refusals while it stays read-only log nothing more;
* it refuses what would need a write with :class:`node.errors.DiskFull`
  (RESOURCE_EXHAUSTED, "disk full: ...") and keeps serving reads
  (``Node.Status`` says ``read_only``; a miner's ``FetchBlocks`` and
  ``FetchUpdate`` work);
* every :data:`PROBE_SECONDS` it looks for space, either by writing and
  removing :data:`PROBE_BYTES` in each of its directories (:meth:`DiskGuard.probe`)
  or by trying the write that failed again (:meth:`DiskGuard.retry`), and it
  leaves read-only mode by itself, with one more log line, once that fits.

What each role does around it (a miner rebuilds its replica from its store,
the server waits to write its checkpoint, a client declines rounds) is in
docs/NETWORK.md, "A full disk".
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final

from node.daemon import NodeLog
from node.durable import is_disk_full, write_durably
from node.errors import DiskFull

PROBE_SECONDS: Final = 2.0
# A probe must fit about one more write of the node's usual size (an update
# blob of a small model is a few hundred KiB), so that recovery does not flap.
PROBE_BYTES: Final = 1 << 20
PROBE_NAME: Final = ".llbcfl-space-probe"


class DiskGuard:
    """Whether this node may write; the one place a full disk turns it read-only."""

    def __init__(self, log: NodeLog, *directories: Path, probe_bytes: int = PROBE_BYTES) -> None:
        self.log = log
        self.directories = list(dict.fromkeys(Path(d).absolute() for d in directories))
        self.probe_bytes = probe_bytes
        self.failed: str | None = None  # the write that found the disk full; None: writable
        self._since = 0.0

    @property
    def read_only(self) -> bool:
        return self.failed is not None

    def refusal(self) -> str:
        return f"disk full: {self.log.node_id} is read-only until space is freed"

    def check(self) -> None:
        """Refuse (:class:`DiskFull`) while read-only."""
        if self.failed is not None:
            raise DiskFull(self.refusal())

    @contextlib.contextmanager
    def writing(self, what: str) -> Iterator[None]:
        """Around a write: refused while read-only; a full disk turns the node read-only
        and raises :class:`DiskFull` (any other error passes through unchanged)."""
        self.check()
        with self._catching(what):
            yield

    def retry(self, what: str, write: Callable[[], object]) -> bool:
        """Run ``write`` even while read-only: True once it succeeded (read-only mode
        ends), False when the disk is still full (it starts, if it had not)."""
        try:
            with self._catching(what):
                write()
        except DiskFull:
            return False
        self._leave()
        return True

    def probe(self) -> bool:
        """While read-only, write and remove :attr:`probe_bytes` in every directory;
        leave read-only mode when they fit. True when the node may write."""
        if self.failed is None:
            return True
        filler = hashlib.shake_256(b"llbcfl space probe").digest(self.probe_bytes)
        try:
            for directory in self.directories:
                path = directory / f"{PROBE_NAME}-{os.getpid()}"  # processes may share one
                try:
                    write_durably(path, filler)
                finally:
                    path.unlink(missing_ok=True)
        except OSError:  # still full (or not writable at all): stay read-only, quietly
            return False
        self._leave()
        return True

    @contextlib.contextmanager
    def _catching(self, what: str) -> Iterator[None]:
        try:
            yield
        except Exception as exc:
            if not is_disk_full(exc):
                raise
            self._enter(what, exc)
            raise DiskFull(self.refusal()) from exc

    def _enter(self, what: str, exc: BaseException) -> None:
        if self.failed is not None:
            return
        self.failed = what
        self._since = time.monotonic()
        where = ", ".join(str(d) for d in self.directories)
        self.log.error(
            f"disk full while {what} ({type(exc).__name__}: {exc}): read-only until space "
            f"is freed in {where}; writes are refused (RESOURCE_EXHAUSTED), reads served, "
            f"space probed every {PROBE_SECONDS:g} s",
            event="read-only",
        )

    def _leave(self) -> None:
        if self.failed is None:
            return
        self.failed = None
        self.log.info(
            f"disk has room again after {time.monotonic() - self._since:.0f} s: "
            "leaving read-only mode",
            event="writable",
        )
