"""What every daemon shares besides the transport: logging, signals, chain records, data.

The gRPC side (options, channels, servicer wrapping, ``serve``) is
``node.serving``; a role's daemon is ``run_<role>`` in ``node.<role>_service``,
run by :func:`run_until_signal` (``node.roles``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from logging.handlers import RotatingFileHandler
from pathlib import Path

from chain.records import Record, encode_operation, record_kind_name
from fl.config import RunConfig
from fl.datasets import Splits, load_splits
from node.durable import is_disk_full
from node.identity import Identity, signing_tag, verify_signature
from node.membership import Membership
from proto import llbcfl_pb2 as pb

# A log line never exceeds this many characters (peers' text, such as a
# tensor name or an error string, is quoted in some lines) ...
MAX_LOG_LINE = 1_000
# ... and a log file is rotated at this size, keeping LOG_BACKUPS old ones.
MAX_LOG_BYTES = 10 * 2**20
LOG_BACKUPS = 3
# Refusals of unsigned traffic: at most one log line per this many seconds.
OUTSIDER_LOG_SECONDS = 10.0
# Control characters are escaped, so no text can forge a second log line.
_CONTROL = {c: f"\\x{c:02x}" for c in (*range(32), 127)}


def clean_log_text(message: str) -> str:
    """``message`` with control characters escaped, cut to :data:`MAX_LOG_LINE`."""
    text = message.translate(_CONTROL)
    if len(text) > MAX_LOG_LINE:
        cut = len(text) - MAX_LOG_LINE
        text = f"{text[:MAX_LOG_LINE]}... ({cut} more characters)"
    return text


class QuietOnFullDisk(logging.Handler):
    """A handler that drops the lines a full disk cannot take, without a word per line.

    logging's default prints a traceback to stderr for every line it fails to
    write, and stderr is usually on the same full disk. This one counts them,
    and once a line fits again, writes first how many were lost (lines a
    stream had buffered may still appear: "up to").
    """

    lost = 0

    def handleError(self, record: logging.LogRecord) -> None:
        if is_disk_full(sys.exc_info()[1]):
            self.lost += 1
            return
        super().handleError(record)

    def emit(self, record: logging.LogRecord) -> None:
        lost, self.lost = self.lost, 0
        if lost:
            note = logging.makeLogRecord(
                {
                    **record.__dict__,
                    "msg": f"up to {lost} log line(s) lost: the disk was full",
                    "args": None,
                }
            )
            super().emit(note)
            if self.lost:  # still full: this line is lost too
                self.lost += lost
                return
        super().emit(record)


class QuietStreamHandler(QuietOnFullDisk, logging.StreamHandler):
    pass


class QuietRotatingFileHandler(QuietOnFullDisk, RotatingFileHandler):
    pass


class NodeLog:
    """Log lines prefixed with ``[node-id r<round>]``, bounded, in a rotated file."""

    def __init__(self, node_id: str, log_file: Path | None = None) -> None:
        self.node_id = node_id
        self.round = 0
        self._outsider_at = -math.inf
        self._outsider_quiet = 0
        self._logger = logging.getLogger(f"llbcfl.{node_id}")
        self._logger.setLevel(logging.INFO)
        self._logger.propagate = False
        if not self._logger.handlers:
            handler: logging.Handler = (
                QuietRotatingFileHandler(log_file, maxBytes=MAX_LOG_BYTES, backupCount=LOG_BACKUPS)
                if log_file
                else QuietStreamHandler(sys.stderr)
            )
            handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
            self._logger.addHandler(handler)

    def _fmt(self, message: str) -> str:
        return f"[{self.node_id} r{self.round}] {clean_log_text(message)}"

    def info(self, message: str) -> None:
        self._logger.info(self._fmt(message))

    def warning(self, message: str) -> None:
        self._logger.warning(self._fmt("WARNING " + message))

    def error(self, message: str) -> None:
        self._logger.error(self._fmt("ERROR " + message))

    def exception(self, message: str) -> None:
        """:meth:`error` with the traceback of the exception being handled (node log only)."""
        self._logger.error(self._fmt("ERROR " + message), exc_info=True)

    def refused_outsider(self, message: str) -> None:
        """A warning about traffic no member signed: one line per :data:`OUTSIDER_LOG_SECONDS`.

        An outsider can send unsigned requests as fast as it likes; each
        must not cost a log line. The next line says how many were not logged.
        """
        now = time.monotonic()
        if now - self._outsider_at < OUTSIDER_LOG_SECONDS:
            self._outsider_quiet += 1
            return
        quiet, self._outsider_quiet, self._outsider_at = self._outsider_quiet, 0, now
        more = f" ({quiet} more such refusals not logged)" if quiet else ""
        self.warning(message + more)


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
