"""What every daemon shares besides the transport: logging, signals, chain records, data.

The log itself (:class:`NodeLog`, text or JSON lines) is ``node.logs``.

The gRPC side (options, channels, servicer wrapping, ``serve``) is
``node.serving``; a role's daemon is ``run_<role>`` in ``node.<role>_service``,
run by :func:`run_until_signal` (``node.roles``).
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable

from chain.records import Record, encode_operation, record_kind_name
from fl.config import RunConfig
from fl.datasets import Splits, load_splits
from node.identity import Identity, signing_tag, verify_signature
from node.logs import (  # re-exported: the roles import their log from here
    LOG_FORMATS,
    MAX_LOG_LINE,
    NodeLog,
    QuietRotatingFileHandler,
    QuietStreamHandler,
    clean_log_text,
)
from node.membership import Membership
from proto import llbcfl_pb2 as pb

__all__ = [
    "LOG_FORMATS",
    "MAX_LOG_LINE",
    "NodeLog",
    "QuietRotatingFileHandler",
    "QuietStreamHandler",
    "clean_log_text",
    "load_node_splits",
    "record_verifier",
    "roles_of",
    "run_until_signal",
    "signed_record",
]


def record_verifier(membership: Membership) -> Callable[[str, str, str, bytes, bytes], bool]:
    """``ChainState.check_block(verify=...)``: the submitter's signature over the record."""

    def verify(node_id: str, role: str, kind: str, operation: bytes, signature: bytes) -> bool:
        node = membership.get(node_id)
        if node is None or node.role != role:
            return False
        return verify_signature(node.public_key, signing_tag(kind) + operation, signature)

    return verify


def roles_of(membership: Membership) -> dict[str, str]:
    return {n.node_id: n.role for n in membership}


def signed_record(identity: Identity, record: Record) -> pb.Envelope:
    """The envelope a node submits to the miners (``Miner.Submit``)."""
    operation = encode_operation(record)
    return identity.sign(record_kind_name(record), operation)


async def run_until_signal(
    main: Callable[[asyncio.Event], Awaitable[None]], *, log: NodeLog | None = None
) -> None:
    """Run ``main(stop)``; SIGINT/SIGTERM set ``stop`` (main must return soon after)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await main(stop)
    finally:
        if log is not None:
            log.info("stopped")


def load_node_splits(config: RunConfig, data_dir: str | None, *, train: bool) -> Splits:
    """The dataset's splits of a daemon, from ``--data-dir`` or the genesis' data dir.

    Miners use only the validation split and the server only the test split;
    with ``train=False`` they skip the clients' training images (60,000 as
    float32 are 188 MB, about 600 MB at peak while converting).
    """
    return load_splits(config, data_dir=data_dir, train=train)
