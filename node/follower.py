"""Following the chain from outside the miners: the server's and the clients' view.

A follower reads committed blocks from a miner's ``FetchBlocks`` and applies
a block to its :class:`chain.records.ChainState` only with a valid commit
certificate (2f+1 miner signatures, ``consensus.ledger.check_block``), so a
single lying miner cannot make it act on a block that was not committed.
When a miner fails to answer (or stalls for STALL_SECONDS) or serves a bad
block, it moves on to the next.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import grpc

from chain.state import ChainState
from consensus.canonical import MalformedMessage
from consensus.ledger import Block, check_block
from node.daemon import NodeLog
from node.genesis import Genesis
from node.identity import pbft_verifier
from node.serving import channel
from proto import llbcfl_pb2 as pb
from proto import llbcfl_pb2_grpc as pb_grpc

POLL_SECONDS = 0.05
# A miner whose block stream sends nothing (not even its end) for this long is
# skipped for the next one: a hung or stopped miner (one of the f faulty ones)
# must not hold a client's start of a round for the whole call's 10 s, longer
# than the server's notice lasts (--notify-timeout, default 10 s).
STALL_SECONDS = 3.0


class ChainFollower:
    """A certified copy of the chain, fetched from the miners."""

    def __init__(
        self, genesis: Genesis, log: NodeLog, *, on_advance: Callable[[], None] | None = None
    ) -> None:
        self.genesis = genesis
        self.log = log
        self.miners = genesis.membership.miners
        self.verify = pbft_verifier(genesis.membership)
        self.state = ChainState(
            genesis.run,
            clients=tuple(c.node_id for c in genesis.membership.clients),
            selection_seed=genesis.protocol.selection_seed,
        )
        self.blocks: list[Block] = []
        self._cursor = 0
        self._lock = asyncio.Lock()
        self._channels: dict[str, grpc.aio.Channel] = {}
        # True once the chain was read up to some miner's head.
        self.caught_up = False
        # Called after a read that applied at least one block (once per read,
        # not per block: catching up on a long chain calls it once).
        self.on_advance = on_advance

    def accept(self, data: bytes) -> bool:
        """Apply one block from a miner if it is the certified successor of our head."""
        try:
            block = Block.decode(data)
        except MalformedMessage:
            return False
        if block.height <= self.state.height:
            return True
        reason = check_block(
            block,
            previous_hash=self.state.head_hash,
            height=self.state.height + 1,
            verify=self.verify,
            n=self.genesis.protocol.miners,
        )
        if reason:
            self.log.warning(f"block {block.height} from a miner refused: {reason}")
            return False
        self.state.apply_block(block)
        self.blocks.append(block)
        self.log.height = block.height
        if block.certificate is not None:  # the view it committed in
            self.log.view = block.certificate.view
        return True

    async def _read_from(self, address: str) -> None:
        ch = self._channels.get(address)
        if ch is None:
            ch = self._channels[address] = channel(address)
        request = pb.FetchBlocksRequest(from_height=self.state.height + 1)
        call = pb_grpc.MinerStub(ch).FetchBlocks(request, timeout=10)
        try:
            while (item := await asyncio.wait_for(call.read(), STALL_SECONDS)) is not grpc.aio.EOF:
                if not self.accept(item.block):
                    raise ValueError("bad block")
        except BaseException:
            call.cancel()
            del self._channels[address]
            await ch.close()
            raise

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close()
        self._channels.clear()

    async def catch_up(self, *, attempts: int | None = None) -> bool:
        """Read the chain up to the head of the first miner that answers.

        Tries each miner in turn (``attempts`` of them; default: each once)
        and returns False when none answered.
        """
        async with self._lock:
            height = self.state.height
            try:
                for _ in range(attempts or len(self.miners)):
                    miner = self.miners[self._cursor % len(self.miners)]
                    try:
                        await self._read_from(miner.address)
                    except (grpc.aio.AioRpcError, ValueError, TimeoutError):
                        self._cursor += 1
                        continue
                    self.caught_up = True
                    return True
                return False
            finally:
                if self.on_advance is not None and self.state.height != height:
                    self.on_advance()

    async def follow(self, stop: asyncio.Event) -> None:
        """Keep reading new blocks until ``stop`` is set.

        Logs once when no miner has answered for a whole pass over the
        miners (a node cut from the miners), and once when one answers again.
        """
        failures = 0
        cut_off = False
        try:
            while not stop.is_set():
                answered = await self.catch_up(attempts=1)
                failures = 0 if answered else failures + 1
                if failures >= len(self.miners) and not cut_off:
                    cut_off = True
                    self.log.warning(
                        f"cannot reach any of the {len(self.miners)} miners "
                        f"(chain height {self.state.height}); retrying",
                        event="miners-unreachable",
                    )
                elif answered and cut_off:
                    cut_off = False
                    self.log.info(
                        f"miners reachable again (chain height {self.state.height})",
                        event="miners-reachable",
                    )
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), POLL_SECONDS if answered else 0.2)
        finally:
            await self.close()
