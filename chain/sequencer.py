"""The simulator's chain: one replica, no network, every record in a block of its own.

:class:`Sequencer` checks each record against the chain state with the
replicas' own rules (``ChainState.check_record``: the transition table, the
selection against Algorithm 1, reputations and privacy recomputed) and
commits it as the next block, so ``simulate`` runs the very application
the miners agree on. It signs nothing: its submitters are in the same
process, and the miners' signature, role and blob checks are transport
concerns of the network.
"""

from __future__ import annotations

from chain.records import Record, encode_operation, timestamp_of
from chain.state import ChainState
from consensus.ledger import Block, Request, encode_batch


class Sequencer:
    def __init__(self, state: ChainState) -> None:
        self.state = state

    def commit(self, submitter: str, record: Record) -> Block:
        """Check ``record`` on the current state, then apply it as the next block."""
        self.state.check_record(submitter, record)  # InvalidRecord: a bug of the caller
        request = Request(submitter, timestamp_of(record), encode_operation(record), b"")
        block = Block.propose(
            height=self.state.height + 1,
            previous_hash=self.state.head_hash,
            view=0,
            proposer=0,
            payload=encode_batch([request]),
        )
        self.state.apply_block(block)
        return block
