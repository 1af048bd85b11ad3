"""``chain verify`` on a certified, correctly signed chain that holds a record no replica admits.

The blocks are built by hand, signed by the fixed network's keys and
certified by three of its four miners, so only the application's admission
rules (``chain.admission`` through ``ChainState.check_block``) can refuse them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from chain.records import Record, Registration, encode_operation, timestamp_of
from commands.chaintools import verify_chain_file
from consensus.ledger import (
    COMMIT_TAG,
    GENESIS_HASH,
    Block,
    CommitCertificate,
    Request,
    encode_batch,
    vote_bytes,
)
from consensus.store import BlockStore
from fl.config import RunConfig
from node.daemon import signed_record
from node.genesis import write_genesis
from node.identity import Identity, pbft_signer, pbft_verifier
from tests.node.conftest import network_genesis

CAP = 500
RUN = RunConfig(clients=3, frac=0.67, rounds=2, model="mlp", max_records=CAP)
HONEST = (50, 50) + (0,) * 9


def signed_request(identity: Identity, record: Record) -> Request:
    envelope = signed_record(identity, record)
    return Request(
        identity.node_id, timestamp_of(record), encode_operation(record), envelope.signature
    )


def certified_chain(batches: list[list[Request]], identities: dict[str, Identity]) -> list[Block]:
    blocks, previous = [], GENESIS_HASH
    for height, batch in enumerate(batches, start=1):
        block = Block.propose(
            height=height, previous_hash=previous, view=0, proposer=0, payload=encode_batch(batch)
        )
        signatures = [
            (
                i,
                pbft_signer(identities[f"miner-{i}"])(
                    vote_bytes(COMMIT_TAG, view=0, height=height, digest=block.digest, sender=i)
                ),
            )
            for i in range(3)
        ]
        cert = CommitCertificate(view=0, height=height, digest=block.digest, signatures=signatures)
        blocks.append(block.with_certificate(cert))
        previous = block.digest
    return blocks


def verify(batches: list[list[Request]], identities: dict[str, Identity], tmp: Path) -> str:
    genesis = network_genesis(RUN)
    write_genesis(genesis, tmp / "genesis.toml")
    store = BlockStore(tmp / "chain.db", verify=pbft_verifier(genesis.membership), n=4)
    for block in certified_chain(batches, identities):
        store.append(block)
    store.close()
    check = verify_chain_file(tmp / "chain.db", tmp / "genesis.toml")
    ok, message = check.ok, check.message
    assert ok == message.startswith("chain OK"), message
    return message


def register(identities: dict[str, Identity], cid: str, histogram: tuple[int, ...]) -> Request:
    return signed_request(identities[cid], Registration(cid, histogram))


def test_a_chain_of_admissible_registrations_verifies(
    identities: dict[str, Identity], tmp_path: Path
) -> None:
    batches = [[register(identities, c, HONEST)] for c in ("client-000", "client-001")]
    assert verify(batches, identities, tmp_path).startswith("chain OK: 2 blocks")


@pytest.mark.parametrize(
    ("second", "reason"),
    [
        (
            lambda ids: [register(ids, "client-001", (10**9,) + (0,) * 10)],
            "count 0 is 1000000000, outside [-500, 500]",
        ),
        (
            lambda ids: [register(ids, "client-001", (CAP // 10 + 1,) * 10 + (0,))],
            "claims 510 records, more than the record cap 500",
        ),
        (
            lambda ids: [register(ids, "client-000", HONEST)],
            "client-000/0: timestamp already used",
        ),
    ],
    ids=["bin-beyond-cap", "total-beyond-cap", "registration-again"],
)
def test_verify_refuses_a_certified_block_holding_an_inadmissible_record(
    identities: dict[str, Identity], tmp_path: Path, second: object, reason: str
) -> None:
    # Prepare: block 1 registers client-000; block 2 holds the bad record
    batches = [[register(identities, "client-000", HONEST)], second(identities)]  # type: ignore[operator]
    # Execute
    message = verify(batches, identities, tmp_path)
    # Assert: the first bad height and why
    assert message.startswith("chain INVALID at height 2: ")
    assert reason in message
