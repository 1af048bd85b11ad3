"""Commit records to a ``ChainState`` as real blocks, the way a replica applies them.

``ChainState.apply_block`` (not ``apply_record``) is what fixes the seed of
the next selection (the digest of the block that made the round due), so
tests that need a selection build their state through these blocks.
Signatures are placeholders: applying a committed block checks none.
"""

from __future__ import annotations

from chain.records import Record, encode_operation, timestamp_of
from chain.state import ChainState
from consensus.ledger import Block, Request, encode_batch


def record_request(submitter: str, record: Record) -> Request:
    return Request(submitter, timestamp_of(record), encode_operation(record), b"sig")


def next_block(state: ChainState, requests: list[Request]) -> Block:
    """The block that extends ``state``'s head with ``requests``."""
    return Block.propose(
        height=state.height + 1,
        previous_hash=state.head_hash,
        view=0,
        proposer=0,
        payload=encode_batch(requests),
    )


def commit(state: ChainState, records: list[tuple[str, Record]]) -> Block:
    """Apply ``(submitter, record)`` entries as ``state``'s next block; return it."""
    block = next_block(state, [record_request(*entry) for entry in records])
    state.apply_block(block)
    return block
