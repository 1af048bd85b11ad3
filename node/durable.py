"""The one way this project writes a file that must survive a crash.

``write_durably`` (and ``open_durably``, for data streamed in) writes to a
temporary file in the target's directory (created with mode 0600, so a
secret is never readable by others, not even for a moment), flushes and
fsyncs it, sets the final mode, renames it over the target and fsyncs the
directory. After a crash the target is either the
old or the new version, never a mixture, and once the call returns the new
version is on disk (the rename is durable only after the directory's fsync).

:func:`is_disk_full` tells a full disk (or quota) apart from other write
errors, for SQLite's writes too; what a node does then is ``node.full_disk``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from consensus.store import is_full

# No space left on the device, or the user's quota on it is used up.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)})


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or an exception it was raised from) says the disk or quota is full.

    ``OSError`` with ENOSPC or EDQUOT, and SQLite's SQLITE_FULL ("database
    or disk is full", what SQLite reports for an ENOSPC of its own writes) or
    a WAL shared-memory file that cannot grow (``consensus.store.is_full``).
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            return True
        if is_full(exc):  # SQLite's own words for it (consensus.store)
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def fsync_directory(directory: Path) -> None:
    # Windows cannot open a directory for fsync; there the rename is as good
    # as it gets.
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def open_durably(path: Path, *, mode: int = 0o600) -> Iterator[BinaryIO]:
    """A binary handle whose content replaces ``path`` (file mode ``mode``) atomically
    and durably when the block ends; an exception in the block leaves ``path`` as it
    was and removes the temporary file (for data streamed in, such as a download)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def write_durably(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` atomically and durably (file mode ``mode``)."""
    with open_durably(path, mode=mode) as handle:
        handle.write(data)


def write_json_durably(path: Path, doc: Any, *, mode: int = 0o644) -> None:
    """``doc`` as indented JSON through :func:`write_durably` (serialised first,
    so a document that cannot be written as JSON leaves nothing behind)."""
    data = json.dumps(doc, indent=1, allow_nan=True).encode("utf-8")
    write_durably(path, data, mode=mode)
