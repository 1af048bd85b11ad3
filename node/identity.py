"""Node identities: Ed25519 keys, key files, signed envelopes (domain-separated).

The only module that imports PyNaCl. A node's :class:`Identity` is its id,
role and Ed25519 signing key; key files hold the 32-byte seed in hex, are
written atomically with mode 0600 and refused when group or others can read
them.

Signatures are domain-separated: an :class:`~proto.llbcfl_pb2.Envelope` of
kind ``k`` is signed over ``b"LLBCFL/v1/" + k + b"\\0" + payload``, so a
signature made for one kind never verifies as another. consensus/ signs its
own canonical bytes, which start with ``b"LLBCFL/pbft/v1/"``;
:func:`pbft_signer` and :func:`pbft_verifier` adapt an identity and the
membership to the callables ``consensus.replica.Replica`` takes.
"""

from __future__ import annotations

import functools
import os
import re
import stat
import sys
from collections.abc import Callable, Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

import tomli_w
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from consensus.canonical import PROTOCOL as PBFT_PROTOCOL
from node.durable import write_durably
from proto import llbcfl_pb2 as pb

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

if TYPE_CHECKING:
    from node.membership import Membership, NodeInfo

ROLES: Final = ("client", "miner", "server")
SEED_SIZE: Final = 32
PUBLIC_KEY_SIZE: Final = 32
ENVELOPE_PROTOCOL: Final = b"LLBCFL/v1/"
_KIND = re.compile(r"[a-z0-9][a-z0-9-]*")

AuthReason = Literal["unknown-signer", "wrong-role", "bad-signature", "wrong-kind"]


class AuthError(Exception):
    """A signed message that must not be accepted; ``reason`` says why."""

    def __init__(self, reason: AuthReason, message: str) -> None:
        super().__init__(message)
        self.reason: AuthReason = reason


class KeyFileError(Exception):
    """A key file that cannot be used (missing, malformed, or readable by others)."""


def signing_tag(kind: str) -> bytes:
    """Prefix of the signed bytes of an envelope of ``kind``: ``LLBCFL/v1/<kind>\\0``."""
    if not _KIND.fullmatch(kind):
        raise ValueError(f"envelope kind must match [a-z0-9][a-z0-9-]*, got {kind!r}")
    return ENVELOPE_PROTOCOL + kind.encode("ascii") + b"\x00"


class Identity:
    """One node's id, role and signing key; never printed with its seed."""

    __slots__ = ("_key", "node_id", "public_key", "role")

    def __init__(self, *, node_id: str, role: str, seed: bytes) -> None:
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        if len(seed) != SEED_SIZE:
            raise ValueError(f"an Ed25519 seed is {SEED_SIZE} bytes, got {len(seed)}")
        self.node_id = node_id
        self.role = role
        self._key = SigningKey(bytes(seed))
        self.public_key: bytes = bytes(self._key.verify_key)

    @classmethod
    def generate(cls, *, node_id: str, role: str, seed: bytes | None = None) -> Identity:
        """A new identity from ``seed``, else from ``os.urandom``."""
        return cls(node_id=node_id, role=role, seed=os.urandom(SEED_SIZE) if seed is None else seed)

    @property
    def seed(self) -> bytes:
        return bytes(self._key)

    def _sign_raw(self, data: bytes) -> bytes:
        # Private: every signature must carry a domain tag (sign, pbft_signer).
        return self._key.sign(data).signature

    def sign(self, kind: str, payload: bytes) -> pb.Envelope:
        """An envelope of ``kind`` over ``payload``, signed with the domain tag."""
        signature = self._sign_raw(signing_tag(kind) + payload)
        return pb.Envelope(kind=kind, payload=payload, signer=self.public_key, signature=signature)

    def __repr__(self) -> str:
        return f"Identity({self.node_id!r}, {self.role!r}, public_key={self.public_key.hex()})"


@functools.lru_cache(maxsize=4096)
def _verify_key(public_key: bytes) -> VerifyKey:
    return VerifyKey(public_key)


def verify_signature(public_key: bytes, data: bytes, signature: bytes) -> bool:
    """True when ``signature`` is ``public_key``'s Ed25519 signature of ``data``."""
    if len(public_key) != PUBLIC_KEY_SIZE:
        return False
    try:
        _verify_key(bytes(public_key)).verify(data, signature)
    except (BadSignatureError, ValueError, TypeError):
        return False
    return True


def verify_envelope(
    envelope: pb.Envelope,
    membership: Membership,
    *,
    expected_kind: str,
    allowed_roles: Collection[str],
) -> NodeInfo:
    """The member that signed ``envelope``; :class:`AuthError` unless all checks pass.

    Checked in order: the kind is the one expected here, the signer is in
    the membership, its role is allowed, and the signature covers the
    expected kind's tag and the payload.
    """
    if envelope.kind != expected_kind:
        raise AuthError(
            "wrong-kind", f"expected a {expected_kind!r} message, got {envelope.kind!r}"
        )
    signer = membership.by_public_key(envelope.signer)
    if signer is None:
        raise AuthError("unknown-signer", f"signer {envelope.signer.hex()} is not a member")
    if signer.role not in allowed_roles:
        raise AuthError(
            "wrong-role",
            f"{signer.node_id} is a {signer.role}; {expected_kind!r} needs "
            f"{' or '.join(sorted(allowed_roles))}",
        )
    signed = signing_tag(expected_kind) + envelope.payload
    if not verify_signature(signer.public_key, signed, envelope.signature):
        raise AuthError("bad-signature", f"bad {expected_kind!r} signature from {signer.node_id}")
    return signer


def pbft_signer(identity: Identity) -> Callable[[bytes], bytes]:
    """``sign(payload) -> signature`` for ``Replica(sign=...)``.

    Refuses bytes that are not PBFT-tagged, so the replica's key can never be
    made to sign something that parses as an envelope or anything else.
    """
    if identity.role != "miner":
        raise ValueError(f"only miners sign PBFT messages; {identity.node_id} is a {identity.role}")

    def sign(payload: bytes) -> bytes:
        if not payload.startswith(PBFT_PROTOCOL):
            raise ValueError("refusing to sign bytes without the PBFT domain tag")
        return identity._sign_raw(payload)

    return sign


def pbft_verifier(membership: Membership) -> Callable[[int, bytes, bytes], bool]:
    """``verify(replica_index, payload, signature) -> bool`` for ``Replica(verify=...)``."""
    keys = [miner.public_key for miner in membership.miners]

    def verify(signer_id: int, payload: bytes, signature: bytes) -> bool:
        if not 0 <= signer_id < len(keys):
            return False
        return verify_signature(keys[signer_id], payload, signature)

    return verify


# Key files ---------------------------------------------------------------


def save_identity(identity: Identity, path: Path) -> None:
    """Write the key file (TOML: node id, role, hex seed and public key), mode 0600."""
    doc = {
        "node_id": identity.node_id,
        "role": identity.role,
        "seed": identity.seed.hex(),
        "public_key": identity.public_key.hex(),
    }
    text = "# LL-BCFL node key: keep this file secret (mode 0600).\n" + tomli_w.dumps(doc)
    write_durably(Path(path), text.encode("utf-8"), mode=0o600)


def load_identity(path: Path) -> Identity:
    """Read a key file written by :func:`save_identity`; :class:`KeyFileError` on any defect."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
        raw = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc.strerror}") from exc
    if os.name == "posix" and mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(
            f"key file {path} is accessible by group or others (mode {stat.S_IMODE(mode):04o}); "
            f"run: chmod 600 {path}"
        )
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise KeyFileError(f"key file {path} is not valid TOML: {exc}") from exc
    return _identity_from_doc(doc, path)


def _identity_from_doc(doc: dict[str, Any], path: Path) -> Identity:
    fields = ("node_id", "role", "seed", "public_key")
    missing = [name for name in fields if not isinstance(doc.get(name), str)]
    if missing:
        raise KeyFileError(f"key file {path} lacks string field(s): {', '.join(missing)}")
    unknown = sorted(set(doc) - set(fields))
    if unknown:
        raise KeyFileError(f"key file {path} has unknown field(s): {', '.join(unknown)}")
    try:
        seed = bytes.fromhex(doc["seed"])
        identity = Identity(node_id=doc["node_id"], role=doc["role"], seed=seed)
    except ValueError as exc:
        raise KeyFileError(f"key file {path}: bad seed or role: {exc}") from exc
    if identity.public_key.hex() != doc["public_key"].lower():
        raise KeyFileError(f"key file {path}: public_key does not match the seed")
    return identity
