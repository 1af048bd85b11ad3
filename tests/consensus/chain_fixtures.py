"""Build certified chains for ledger and store tests."""

from __future__ import annotations

import random

from consensus.ledger import (
    COMMIT_TAG,
    GENESIS_HASH,
    Block,
    CommitCertificate,
    Request,
    encode_batch,
    vote_bytes,
)
from consensus.sim import FakeKeyring

N = 4


def keyring() -> FakeKeyring:
    return FakeKeyring(N, random.Random(11))


def certify(block: Block, keys: FakeKeyring, *, signers: tuple[int, ...] = (0, 1, 2)) -> Block:
    signatures = [
        (
            i,
            keys.signer(i)(
                vote_bytes(COMMIT_TAG, view=0, height=block.height, digest=block.digest, sender=i)
            ),
        )
        for i in signers
    ]
    return block.with_certificate(
        CommitCertificate(view=0, height=block.height, digest=block.digest, signatures=signatures)
    )


def make_chain(length: int, keys: FakeKeyring) -> list[Block]:
    blocks: list[Block] = []
    previous = GENESIS_HASH
    for height in range(1, length + 1):
        payload = encode_batch([Request("alice", height, b"op-%d" % height, b"")])
        block = Block.propose(
            height=height, previous_hash=previous, view=0, proposer=0, payload=payload
        )
        blocks.append(certify(block, keys))
        previous = block.digest
    return blocks
