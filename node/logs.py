"""Node logs: one line per entry, as text or JSON, bounded, escaped, rotated.

Every line says which node wrote it and where that node stood: its role,
the federated round, the PBFT view and the chain height (``NodeLog.round``,
``.view`` and ``.height``, set by the roles as they move on: a miner from
its replica and chain, the server and clients from the chain they follow).

* ``text`` (the default)::

      2024-05-01 12:00:00,123 [miner-2 r3 v1 h12] WARNING view change: view 0 -> 1 ...

* ``json`` (``node --log-format json``): one JSON object per line, with
  ``ts`` (ISO-8601, UTC), ``level``, ``node``, ``role``, ``round``, ``view``,
  ``height``, ``msg``, and ``event`` for the lines of typed events
  (:data:`EVENTS`); ``exc`` holds a traceback, when there is one.

Text from peers (a tensor name, an error string) cannot forge a second line
or grow a line without bound: control characters (and Unicode line
separators) are escaped, and a message is cut at :data:`MAX_LOG_LINE`
characters. A log file rotates at :data:`MAX_LOG_BYTES`, keeping
:data:`LOG_BACKUPS` old ones; on a full disk lines are dropped and counted
(:class:`QuietOnFullDisk`), never traced.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from datetime import UTC, datetime
from logging.handlers import RotatingFileHandler
from pathlib import Path
from typing import Final

from node.durable import is_disk_full

# A log message never exceeds this many characters (peers' text, such as a
# tensor name or an error string, is quoted in some lines) ...
MAX_LOG_LINE = 1_000
# ... nor a traceback (JSON lines) this many ...
MAX_TRACEBACK = 20 * MAX_LOG_LINE
# ... and a log file is rotated at this size, keeping LOG_BACKUPS old ones.
MAX_LOG_BYTES = 10 * 2**20
LOG_BACKUPS = 3
# Refusals of unsigned traffic: at most one log line per this many seconds.
OUTSIDER_LOG_SECONDS = 10.0

LOG_FORMATS: Final = ("text", "json")
# The ``event`` of typed lines (JSON); each is logged once per occurrence.
EVENTS: Final = (
    "round-start",  # a miner opens a round / the server starts one
    "view-change",  # a miner enters a new PBFT view
    "catch-up",  # a miner finds a peer ahead of it and asks it for blocks
    "state-transfer",  # a miner applied certified blocks a peer sent (BLOCKS)
    "peer-up",  # a miner's link to a peer came up for the first time
    "peer-lost",  # ... went down (once per outage, not per retry)
    "peer-recovered",  # ... came up again after being down
    "no-quorum",  # the server's record reached fewer than a quorum of miners
    "miners-unreachable",  # a follower (server, clients) reaches no miner at all
    "miners-reachable",  # ... and reaches one again
    "read-only",  # the disk is full: the node turns read-only
    "writable",  # ... and has room again
)

# Characters escaped in text lines: C0 and C1 controls, DEL and the Unicode
# line and paragraph separators (str.splitlines breaks on all of those).
_BREAKS = (*range(32), *range(127, 160), 0x2028, 0x2029)
_CONTROL = {c: (f"\\x{c:02x}" if c < 256 else f"\\u{c:04x}") for c in _BREAKS}
# What json.dumps(ensure_ascii=False) leaves raw among those, as JSON escapes.
_JSON_RAW = {c: f"\\u{c:04x}" for c in _BREAKS if c >= 127}


def cut_log_text(text: str, limit: int = MAX_LOG_LINE) -> str:
    """``text`` cut to ``limit`` characters, saying how many were cut."""
    if len(text) > limit:
        text = f"{text[:limit]}... ({len(text) - limit} more characters)"
    return text


def clean_log_text(message: str) -> str:
    """``message`` with control characters escaped, cut to :data:`MAX_LOG_LINE`."""
    return cut_log_text(message.translate(_CONTROL))


def json_log_line(fields: dict[str, object]) -> str:
    """``fields`` as one line of JSON: nothing in a value can break the line."""
    return json.dumps(fields, ensure_ascii=False).translate(_JSON_RAW)


class NodeLogFormatter(logging.Formatter):
    """Formats a :class:`NodeLog` record as text or JSON (the record's ``log_format``).

    Records of other loggers (no node fields) come out as the bare message.
    """

    def format(self, record: logging.LogRecord) -> str:
        node = getattr(record, "node", None)
        message = record.getMessage()
        if getattr(record, "log_format", "text") == "json":
            return self._json(record, message)
        level = "" if record.levelno < logging.WARNING else f"{record.levelname} "
        where = (
            "" if node is None else f"[{node} r{record.round} v{record.view} h{record.height}] "  # type: ignore[attr-defined]
        )
        line = f"{self.formatTime(record)} {where}{level}{clean_log_text(message)}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line

    def _json(self, record: logging.LogRecord, message: str) -> str:
        ts = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        fields: dict[str, object] = {
            "ts": ts.replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "node": getattr(record, "node", None),
            "role": getattr(record, "role", None),
            "round": getattr(record, "round", None),
            "view": getattr(record, "view", None),
            "height": getattr(record, "height", None),
        }
        event = getattr(record, "event", None)
        if event:
            fields["event"] = event
        fields["msg"] = cut_log_text(message)
        if record.exc_info:
            trace = self.formatException(record.exc_info)
            fields["exc"] = trace if len(trace) <= MAX_TRACEBACK else "..." + trace[-MAX_TRACEBACK:]
        return json_log_line(fields)


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
                    "exc_info": None,
                    "exc_text": None,
                    "event": None,
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


class _Position:
    """Where a node stands on the chain; shared by a log and its :meth:`NodeLog.child` logs."""

    __slots__ = ("height", "view")

    def __init__(self) -> None:
        self.view = 0
        self.height = 0


class NodeLog:
    """A node's log lines, with node, role, round, view and height; bounded, in a rotated file.

    ``round``, ``view`` and ``height`` are plain attributes: setting them
    costs nothing, and every later line carries them. ``event`` (one of
    :data:`EVENTS`) marks a typed line; JSON lines carry it.
    """

    def __init__(
        self,
        node_id: str,
        log_file: Path | None = None,
        *,
        role: str = "",
        log_format: str = "text",
        _position: _Position | None = None,
        _logger: logging.Logger | None = None,
    ) -> None:
        if log_format not in LOG_FORMATS:
            raise ValueError(f"log format {log_format!r}: not one of {', '.join(LOG_FORMATS)}")
        self.node_id = node_id
        self.role = role
        self.log_format = log_format
        self.round = 0
        self._position = _position or _Position()
        self._outsider_at = -math.inf
        self._outsider_quiet = 0
        if _logger is not None:  # a child: its lines go through its parent's handler
            self._logger = _logger
            self._logger.setLevel(logging.INFO)
            return
        self._logger = logging.getLogger(f"llbcfl.{node_id}")
        self._logger.setLevel(logging.INFO)
        self._logger.propagate = False
        if not self._logger.handlers:
            handler: logging.Handler = (
                QuietRotatingFileHandler(log_file, maxBytes=MAX_LOG_BYTES, backupCount=LOG_BACKUPS)
                if log_file
                else QuietStreamHandler(sys.stderr)
            )
            handler.setFormatter(NodeLogFormatter())
            self._logger.addHandler(handler)

    @property
    def view(self) -> int:
        return self._position.view

    @view.setter
    def view(self, value: int) -> None:
        self._position.view = value

    @property
    def height(self) -> int:
        return self._position.height

    @height.setter
    def height(self, value: int) -> None:
        self._position.height = value

    def child(self, node_id: str) -> NodeLog:
        """The log of another identity of this process (a hosted client): same role,
        format and destination (this log's handler); its own round; this log's
        view and height."""
        return NodeLog(
            node_id,
            role=self.role,
            log_format=self.log_format,
            _position=self._position,
            _logger=self._logger.getChild(node_id),
        )

    def _log(self, level: int, message: str, event: str | None, exc_info: bool = False) -> None:
        if not self._logger.isEnabledFor(level):
            return
        extra = {
            "node": self.node_id,
            "role": self.role,
            "round": self.round,
            "view": self._position.view,
            "height": self._position.height,
            "event": event,
            "log_format": self.log_format,
        }
        self._logger.log(level, "%s", message, exc_info=exc_info, extra=extra)

    def info(self, message: str, *, event: str | None = None) -> None:
        self._log(logging.INFO, message, event)

    def warning(self, message: str, *, event: str | None = None) -> None:
        self._log(logging.WARNING, message, event)

    def error(self, message: str, *, event: str | None = None) -> None:
        self._log(logging.ERROR, message, event)

    def exception(self, message: str, *, event: str | None = None) -> None:
        """:meth:`error` with the traceback of the exception being handled (node log only)."""
        self._log(logging.ERROR, message, event, exc_info=True)

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
