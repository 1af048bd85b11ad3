"""Durable privacy-budget ledger for the clients hosted on one machine.

DESIGN.md section 5: "A client never exceeds its configured total budget ...
The spent budget survives restarts". The client records a participation here
*before* its update leaves the machine, so a crash after sending can never
forget budget that was spent (a crash before sending only over-counts, which
is the safe direction).

The ledger is one JSON file mapping client id to its
:class:`fl.privacy.PrivacyAccountant` state and the rounds it took part in.
Every write goes to a temporary file in the same directory, is flushed and
fsynced, atomically renamed over the ledger with ``os.replace`` and followed by
an fsync of the directory, so after a crash the file is either the old or the
new version, never a mixture. File I/O only: no sockets, no clocks.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LEDGER_VERSION = 1


class LedgerCorruptError(ValueError):
    """The ledger file exists but cannot be read as a ledger."""


@dataclass(frozen=True)
class LedgerEntry:
    """What the ledger knows about one client."""

    accountant: dict[str, Any]
    rounds: tuple[int, ...]


class BudgetLedger:
    """A JSON ledger of per-client privacy spend, rewritten atomically on each record.

    Every call reads the file afresh, so two ledger objects on the same path
    (or a restarted process) always see the last durable write.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def load(self) -> dict[str, LedgerEntry]:
        """All entries; empty when the file does not exist yet."""
        try:
            raw = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        try:
            document = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise LedgerCorruptError(
                f"privacy ledger {self.path} is not valid JSON: {exc}"
            ) from exc
        return self._parse(document)

    def _parse(self, document: Any) -> dict[str, LedgerEntry]:
        def corrupt(why: str) -> LedgerCorruptError:
            return LedgerCorruptError(f"privacy ledger {self.path} is corrupt: {why}")

        if not isinstance(document, dict) or document.get("version") != LEDGER_VERSION:
            raise corrupt(f"expected an object with version {LEDGER_VERSION}")
        clients = document.get("clients")
        if not isinstance(clients, dict):
            raise corrupt("'clients' is not an object")
        entries: dict[str, LedgerEntry] = {}
        for client_id, entry in clients.items():
            if (
                not isinstance(entry, dict)
                or not isinstance(entry.get("accountant"), dict)
                or not isinstance(entry.get("rounds"), list)
                or not all(type(r) is int for r in entry["rounds"])
            ):
                raise corrupt(f"entry for client {client_id!r} is malformed")
            entries[client_id] = LedgerEntry(entry["accountant"], tuple(entry["rounds"]))
        return entries

    def entry(self, client_id: str) -> LedgerEntry | None:
        """The client's entry, or None for a client that never participated."""
        return self.load().get(client_id)

    def record(self, client_id: str, round: int, state: dict[str, Any]) -> None:
        """Durably store the client's accountant ``state`` after taking part in ``round``.

        Rounds must increase per client: recording an older or repeated round
        would let a stale (smaller) spend overwrite a newer one.
        """
        entries = self.load()
        previous = entries.get(client_id)
        rounds = previous.rounds if previous is not None else ()
        if rounds and round <= rounds[-1]:
            raise ValueError(
                f"client {client_id!r} already recorded round {rounds[-1]}; "
                f"cannot record round {round}"
            )
        entries[client_id] = LedgerEntry(dict(state), (*rounds, round))
        self._write(entries)

    def _write(self, entries: dict[str, LedgerEntry]) -> None:
        document = {
            "version": LEDGER_VERSION,
            "clients": {
                cid: {"accountant": e.accountant, "rounds": list(e.rounds)}
                for cid, e in sorted(entries.items())
            },
        }
        # Serialise before touching the disk, so a bad state never leaves a
        # temporary file behind.
        payload = json.dumps(document, sort_keys=True, indent=1, allow_nan=False)
        directory = self.path.parent
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{self.path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(payload)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        _fsync_directory(directory)


def _fsync_directory(directory: Path) -> None:
    # The rename is only durable once the directory entry is on disk. Windows
    # cannot open a directory for fsync; there the rename is as good as it gets.
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
