"""Canonical bytes for everything consensus hashes or signs.

A fork is the worst bug this system can have, so every digest and signature
covers bytes produced here: fixed field order, big-endian fixed-width
integers, length-prefixed byte strings. Never ``str()``, pickle or dict order.

Signatures are domain-separated: the signed bytes of
every message start with :func:`domain_tag`, which names the protocol
version and the message kind, so a PREPARE signature can never be replayed
as a COMMIT (the kind differs) and view/height are part of every vote body.
"""

from __future__ import annotations

import struct
from typing import Final

PROTOCOL: Final = b"LLBCFL/pbft/v1/"
DIGEST_SIZE: Final = 32
# Bounds on decoded lengths, so a malicious length prefix cannot make a
# replica allocate gigabytes before noticing the input is short.
MAX_BLOB: Final = 64 * 1024 * 1024
MAX_ITEMS: Final = 1_000_000

_U8: Final = struct.Struct(">B")
_U32: Final = struct.Struct(">I")
_U64: Final = struct.Struct(">Q")
_I64: Final = struct.Struct(">q")


class MalformedMessage(ValueError):
    """Raised when bytes do not decode to a well-formed message or block."""


def domain_tag(kind: str) -> bytes:
    """Prefix of the signed bytes of one message kind, e.g. ``LLBCFL/pbft/v1/COMMIT\\0``."""
    return PROTOCOL + kind.encode("ascii") + b"\x00"


def pack_u8(value: int) -> bytes:
    return _U8.pack(value)


def pack_u32(value: int) -> bytes:
    return _U32.pack(value)


def pack_u64(value: int) -> bytes:
    return _U64.pack(value)


def pack_i64(value: int) -> bytes:
    return _I64.pack(value)


def pack_blob(data: bytes) -> bytes:
    """Length-prefixed bytes (u32 length, then the bytes)."""
    return _U32.pack(len(data)) + data


def pack_text(text: str) -> bytes:
    return pack_blob(text.encode("utf-8"))


class Reader:
    """Cursor over canonical bytes; every read checks bounds."""

    __slots__ = ("_data", "_pos")

    def __init__(self, data: bytes) -> None:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise MalformedMessage(f"expected bytes, got {type(data).__name__}")
        self._data = bytes(data)
        self._pos = 0

    def raw(self, size: int) -> bytes:
        end = self._pos + size
        if size < 0 or end > len(self._data):
            raise MalformedMessage(f"truncated: wanted {size} bytes at offset {self._pos}")
        chunk = self._data[self._pos : end]
        self._pos = end
        return chunk

    def u8(self) -> int:
        return _U8.unpack(self.raw(1))[0]

    def u32(self) -> int:
        return _U32.unpack(self.raw(4))[0]

    def u64(self) -> int:
        return _U64.unpack(self.raw(8))[0]

    def i64(self) -> int:
        return _I64.unpack(self.raw(8))[0]

    def flag(self) -> bool:
        value = self.u8()
        if value > 1:
            raise MalformedMessage(f"flag byte must be 0 or 1, got {value}")
        return value == 1

    def count(self) -> int:
        value = self.u32()
        if value > MAX_ITEMS:
            raise MalformedMessage(f"item count {value} exceeds {MAX_ITEMS}")
        return value

    def blob(self) -> bytes:
        size = self.u32()
        if size > MAX_BLOB:
            raise MalformedMessage(f"blob length {size} exceeds {MAX_BLOB}")
        return self.raw(size)

    def text(self) -> str:
        try:
            return self.blob().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MalformedMessage(f"invalid UTF-8 text: {exc}") from None

    def digest(self) -> bytes:
        return self.raw(DIGEST_SIZE)

    def finish(self) -> None:
        if self._pos != len(self._data):
            raise MalformedMessage(f"{len(self._data) - self._pos} trailing bytes")
