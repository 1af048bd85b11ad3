"""Shared wiring for consensus tests: replicas on an in-memory network.

Like etcd raft's test network: messages queue in memory and the test decides
what is delivered, dropped or cut, so every scenario is exact and replayable.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from consensus.ledger import Block, Request
from consensus.messages import Message
from consensus.replica import Replica
from consensus.sim import FakeKeyring
from consensus.store import MemoryBlockStore

Filter = Callable[[int, int, Message], bool]


class Cluster:
    """n replicas, their stores and a FIFO of (source, destination, message)."""

    def __init__(self, n: int, *, validate: Callable[[Block], bool] | None = None) -> None:
        self.n = n
        self.keys = FakeKeyring(n, random.Random(7))
        self.stores = [MemoryBlockStore() for _ in range(n)]
        self.replicas = [
            Replica(
                replica_id=i,
                n=n,
                sign=self.keys.signer(i),
                verify=self.keys.verify,
                validate=validate or (lambda block: True),
                chain=self.stores[i],
            )
            for i in range(n)
        ]
        self.down: set[int] = set()
        self.queue: list[tuple[int, int, Message]] = []
        self.sent: list[tuple[int, int, Message]] = []
        self.executed: list[list[Request]] = [[] for _ in range(n)]

    def collect(self, i: int) -> None:
        replica = self.replicas[i]
        if not replica.has_ready():
            return
        ready = replica.ready()
        for block in ready.blocks:
            self.stores[i].append(block)
        for committed in ready.committed:
            self.executed[i].extend(committed.executed)
        for dest, message in ready.messages:
            targets = [j for j in range(self.n) if j != i] if dest is None else [dest]
            for j in targets:
                self.queue.append((i, j, message))
                self.sent.append((i, j, message))
        replica.advance()

    def deliver(self, *, allow: Filter | None = None, limit: int = 100_000) -> int:
        delivered = 0
        while self.queue and delivered < limit:
            src, dst, message = self.queue.pop(0)
            if dst in self.down or src in self.down:
                continue
            if allow is not None and not allow(src, dst, message):
                continue
            self.replicas[dst].step(message)
            self.collect(dst)
            delivered += 1
        return delivered

    def submit(self, request: Request, *, to: list[int] | None = None) -> None:
        for i in to if to is not None else range(self.n):
            if i not in self.down:
                self.replicas[i].propose(request)
                self.collect(i)

    def tick(self, ticks: int = 1, *, allow: Filter | None = None) -> None:
        for _ in range(ticks):
            for i in range(self.n):
                if i not in self.down:
                    self.replicas[i].tick()
                    self.collect(i)
            self.deliver(allow=allow)

    def heights(self) -> list[int]:
        return [replica.height for replica in self.replicas]


def request(number: int, client: str = "alice") -> Request:
    return Request(client, number, b"op-%d" % number, b"sig")


@pytest.fixture
def cluster4() -> Cluster:
    return Cluster(4)
