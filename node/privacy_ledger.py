"""The privacy-budget ledger of a client host: reserved before release, durable, locked.

Every release a client makes (its registration histogram, each round's
update) is entered here *before* it happens: the entry is on disk
(``node.durable``) before training starts, so a crash at any point can only
over-count, never forget a release. The ledger is keyed by the digest of the
client's records (``fl.data.shard_digest``), not by the client id or the run:
every network that trains on the same records adds to the same history, and
the budget check composes all of it (``fl.privacy.composed_epsilon``). Each
entry names its network (the genesis digest) and round, so a round is
entered at most once per network: a client never trains a round twice, not
even after a restart.

One JSON file may serve several client processes on one machine: every
read-modify-write holds an exclusive ``flock`` on ``<ledger>.lock``, and
within a process the client host serialises its identities on top of it.

Layout (version 2)::

    {"version": 2,
     "data": {"<shard digest hex>": {
         "releases": [{"network": "<genesis digest hex>", "round": 0,
                       "mechanism": "gaussian", "noise": 1.2,
                       "sample_rate": 1.0, "steps": 1}, ...],   # round 0: registration
         "histograms": {"<genesis digest hex>": [61, 58, ...]}}}}
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fl.privacy import BUDGET_RTOL, BudgetExhausted, Mechanism, Release, composed_epsilon
from node.durable import write_durably

LEDGER_VERSION = 2
REGISTRATION_ROUND = 0


class LedgerCorruptError(ValueError):
    """The ledger file exists but cannot be read as a ledger."""


class AlreadyReserved(Exception):
    """This round of this network is already in the ledger: it was trained (or begun)."""


@dataclass(frozen=True)
class LedgerEntry:
    network: str
    round: int
    mechanism: str
    noise: float
    sample_rate: float
    steps: int

    @property
    def release(self) -> tuple[Mechanism, Release]:
        return self.mechanism, Release(self.noise, self.sample_rate, self.steps)  # type: ignore[return-value]


def entry_for(network: bytes, round: int, mechanism: str, release: Release) -> LedgerEntry:
    return LedgerEntry(
        network.hex(), round, mechanism, release.noise, release.sample_rate, release.steps
    )


@dataclass(frozen=True)
class Budget:
    """The budget a release is checked against: the current network's (epsilon, delta)."""

    epsilon: float
    delta: float
    accountant: str

    def spent(self, entries: Iterable[LedgerEntry]) -> float:
        return composed_epsilon(
            [e.release for e in entries if e.mechanism != "none"],
            delta=self.delta,
            accountant=self.accountant,
        )

    def fits(self, entries: Iterable[LedgerEntry]) -> bool:
        return self.spent(entries) <= self.epsilon * (1 + BUDGET_RTOL)


class PrivacyLedger:
    """A JSON ledger of releases per data digest; every change is locked and durable."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    # Reading ------------------------------------------------------------------

    def _load(self) -> dict[str, Any]:
        try:
            raw = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {"version": LEDGER_VERSION, "data": {}}
        try:
            document = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise LedgerCorruptError(
                f"privacy ledger {self.path} is not valid JSON: {exc}"
            ) from exc
        self._check(document)
        return document

    def _check(self, document: Any) -> None:
        def corrupt(why: str) -> LedgerCorruptError:
            return LedgerCorruptError(f"privacy ledger {self.path} is corrupt: {why}")

        if not isinstance(document, dict) or document.get("version") != LEDGER_VERSION:
            raise corrupt(f"expected an object with version {LEDGER_VERSION}")
        data = document.get("data")
        if not isinstance(data, dict):
            raise corrupt("'data' is not an object")
        for digest, item in data.items():
            if (
                not isinstance(item, dict)
                or not isinstance(item.get("releases"), list)
                or not isinstance(item.get("histograms"), dict)
            ):
                raise corrupt(f"entry for data {digest[:16]} is malformed")
            for release in item["releases"]:
                try:
                    entry = LedgerEntry(**release)
                except TypeError as exc:
                    raise corrupt(f"a release of data {digest[:16]} is malformed") from exc
                numbers = (entry.noise, entry.sample_rate)
                if (
                    type(entry.round) is not int
                    or type(entry.steps) is not int
                    or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in numbers)
                ):
                    raise corrupt(f"a release of data {digest[:16]} is malformed")

    def entries(self, data: bytes) -> list[LedgerEntry]:
        """Every release entered for the records with digest ``data``, in order."""
        item = self._load()["data"].get(data.hex())
        return [LedgerEntry(**r) for r in item["releases"]] if item else []

    def histogram(self, data: bytes, network: bytes) -> tuple[int, ...] | None:
        """The histogram these records released to ``network`` (None: not yet)."""
        item = self._load()["data"].get(data.hex())
        found = item["histograms"].get(network.hex()) if item else None
        return tuple(found) if found is not None else None

    def rounds(self, data: bytes, network: bytes) -> set[int]:
        """Rounds of ``network`` entered for these records (registration excluded)."""
        return {
            e.round
            for e in self.entries(data)
            if e.network == network.hex() and e.round != REGISTRATION_ROUND
        }

    # Changing -------------------------------------------------------------------

    def _change(self, data: bytes, change: Callable[[dict[str, Any]], Any]) -> Any:
        """Run ``change`` on the data's item under the lock; if it returns normally
        and changed anything, write the ledger (durably) before releasing the lock."""
        with self._locked():
            document = self._load()
            before = json.dumps(document, sort_keys=True)
            item = document["data"].setdefault(data.hex(), {"releases": [], "histograms": {}})
            result = change(item)
            if json.dumps(document, sort_keys=True) != before:
                payload = json.dumps(document, sort_keys=True, indent=1, allow_nan=False)
                write_durably(self.path, payload.encode("utf-8"), mode=0o600)
            return result

    def register(
        self, data: bytes, entry: LedgerEntry, histogram: tuple[int, ...], budget: Budget
    ) -> tuple[int, ...]:
        """Enter the registration release and its histogram, once per network.

        Returns the histogram to register: the one already entered for this
        network when there is one (re-registering must not release a new
        draw), else ``histogram``. :class:`BudgetExhausted` when the
        registration alone would overspend.
        """

        def change(item: dict[str, Any]) -> tuple[int, ...]:
            known = item["histograms"].get(entry.network)
            if known is not None:
                return tuple(known)
            entries = [LedgerEntry(**r) for r in item["releases"]]
            if not budget.fits([*entries, entry]):
                raise BudgetExhausted("the registration would exceed the privacy budget")
            item["releases"].append(asdict(entry))
            item["histograms"][entry.network] = list(histogram)
            return histogram

        return self._change(data, change)

    def reserve(self, data: bytes, entry: LedgerEntry, budget: Budget) -> float:
        """Enter one round's release before training; return the spend after it.

        :class:`AlreadyReserved` when this network's round is already
        entered; :class:`BudgetExhausted` when it would overspend. Either
        way nothing is written.
        """

        def change(item: dict[str, Any]) -> float:
            entries = [LedgerEntry(**r) for r in item["releases"]]
            if any(e.network == entry.network and e.round == entry.round for e in entries):
                raise AlreadyReserved(f"round {entry.round} was already trained")
            if not budget.fits([*entries, entry]):
                raise BudgetExhausted("privacy budget exhausted")
            item["releases"].append(asdict(entry))
            return budget.spent([*entries, entry])

        return self._change(data, change)

    def adopt(
        self,
        data: bytes,
        entries: Iterable[LedgerEntry],
        histogram: tuple[int, ...] | None = None,
    ) -> int:
        """Enter releases the chain shows but the ledger lacks (a lost or older
        ledger): the spend is the larger of the two. Returns how many were added.

        ``histogram`` is the registration the chain holds for the network of
        the entries; it replaces nothing already entered.
        """
        wanted = list(entries)

        def change(item: dict[str, Any]) -> int:
            have = {(r["network"], r["round"]) for r in item["releases"]}
            added = 0
            for entry in wanted:
                if (entry.network, entry.round) not in have:
                    item["releases"].append(asdict(entry))
                    have.add((entry.network, entry.round))
                    added += 1
                if entry.round == REGISTRATION_ROUND and histogram is not None:
                    item["histograms"].setdefault(entry.network, list(histogram))
            return added

        return self._change(data, change)
