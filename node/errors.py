"""Why a node refuses a request, and the one table that turns it into a gRPC status.

Handlers (the protocol rules of each role) raise domain exceptions and never
see a gRPC context; the servicers' common wrapper (``node.serving``) turns
what they raise into a status with :func:`status_of`:

=================================================  ===================
:class:`InvalidRequest`, ``MalformedMessage``,     INVALID_ARGUMENT
undecodable protobuf (``DecodeError``)
``AuthError`` (wrong-role)                         PERMISSION_DENIED
``AuthError`` (unknown-signer, bad-signature,      UNAUTHENTICATED
wrong-kind)
:class:`NotPermitted`                              PERMISSION_DENIED
:class:`WrongState`                                FAILED_PRECONDITION
:class:`Duplicate`                                 ALREADY_EXISTS
:class:`NotReady`                                  UNAVAILABLE
:class:`NotFound`                                  NOT_FOUND
:class:`Busy`                                      RESOURCE_EXHAUSTED
:class:`TooSlow`                                   DEADLINE_EXCEEDED
:class:`DiskFull` (read-only: ``node.full_disk``)  RESOURCE_EXHAUSTED
``UpdateRejected`` (``node.tensor_receiver``)      its own ``code``
anything else                                      INTERNAL, "internal error"
=================================================  ===================

The caller gets a short message (one line, at most :data:`MAX_DETAIL` characters),
never a traceback; an unexpected exception is logged in full by the node.
"""

from __future__ import annotations

from typing import ClassVar, Final, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from consensus.canonical import MalformedMessage
from node.identity import AuthError

MAX_DETAIL: Final = 200
INTERNAL_DETAIL: Final = "internal error"

AUTH_CODES: Final = {
    "unknown-signer": grpc.StatusCode.UNAUTHENTICATED,
    "bad-signature": grpc.StatusCode.UNAUTHENTICATED,
    "wrong-kind": grpc.StatusCode.UNAUTHENTICATED,
    "wrong-role": grpc.StatusCode.PERMISSION_DENIED,
}

M = TypeVar("M", bound=Message)


class Refused(Exception):
    """A request this node will not act on; ``message`` is what the caller is told."""

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequest(Refused):
    """Malformed or self-contradictory: the same request will never be accepted."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotPermitted(Refused):
    """The signer may not do this (not selected, another's name)."""

    code = grpc.StatusCode.PERMISSION_DENIED


class WrongState(Refused):
    """Does not fit this node's state now (another round, not on the chain)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Duplicate(Refused):
    """Already done once; doing it again is refused."""

    code = grpc.StatusCode.ALREADY_EXISTS


class NotReady(Refused):
    """This node cannot answer yet (e.g. it has not computed the round's model)."""

    code = grpc.StatusCode.UNAVAILABLE


class NotFound(Refused):
    """Nothing held under this name."""

    code = grpc.StatusCode.NOT_FOUND


class Busy(Refused):
    """A per-peer or per-node limit is reached (concurrent streams); retry later."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DiskFull(Refused):
    """This node's disk is full: it is read-only and refuses what would need a write."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class TooSlow(Refused):
    """A stream idle too long between parts, or open longer than streams may be."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


def short(text: str) -> str:
    """``text`` as a status detail: its first line, cut to :data:`MAX_DETAIL` characters."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= MAX_DETAIL else line[: MAX_DETAIL - 3] + "..."


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """The status and message for a domain exception; None for anything unexpected."""
    if isinstance(exc, Refused):
        return exc.code, short(exc.message)
    if isinstance(exc, AuthError):
        return AUTH_CODES[exc.reason], short(str(exc))
    if isinstance(exc, MalformedMessage):
        return grpc.StatusCode.INVALID_ARGUMENT, short(f"malformed message: {exc}")
    if isinstance(exc, DecodeError):
        return grpc.StatusCode.INVALID_ARGUMENT, "malformed protobuf"
    return None


def decode(cls: type[M], raw: bytes, what: str) -> M:
    """``cls`` parsed from ``raw``; :class:`InvalidRequest` ("malformed <what>") if it is not."""
    try:
        return cls.FromString(raw)
    except DecodeError:
        raise InvalidRequest(f"malformed {what}") from None
