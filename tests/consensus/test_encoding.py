"""Canonical encoding: every message and block round-trips; malformed bytes are rejected."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consensus.canonical import MalformedMessage
from consensus.ledger import (
    GENESIS_HASH,
    Block,
    CommitCertificate,
    Request,
    decode_batch,
    encode_batch,
)
from consensus.messages import (
    Blocks,
    Commit,
    Fetch,
    Forward,
    Message,
    NewView,
    Prepare,
    PreparedCertificate,
    PrePrepare,
    ViewChange,
    decode_message,
)

DIGEST = bytes(range(32))


def _block() -> Block:
    payload = encode_batch([Request("alice", 1, b"op", b"sig")])
    return Block.propose(height=1, previous_hash=GENESIS_HASH, view=0, proposer=0, payload=payload)


def _messages() -> list[Message]:
    block = _block()
    pre = PrePrepare(view=0, height=1, block=block, sender=0, signature=b"s0")
    prepares = [
        Prepare(view=0, height=1, digest=block.digest, sender=i, signature=b"p") for i in (1, 2)
    ]
    cert = CommitCertificate(
        view=0, height=1, digest=block.digest, signatures=[(0, b"a"), (1, b"b"), (2, b"c")]
    )
    vc = ViewChange(
        new_view=1,
        checkpoint_height=1,
        checkpoint_digest=block.digest,
        checkpoint=cert,
        prepared=[PreparedCertificate(pre, prepares)],
        sender=2,
        signature=b"vc",
    )
    nv = NewView(view=1, view_changes=[vc], pre_prepares=[pre], sender=1, signature=b"nv")
    return [
        pre,
        prepares[0],
        Commit(view=3, height=9, digest=DIGEST, sender=3, signature=b"c"),
        vc,
        nv,
        Fetch(from_height=5, sender=1, signature=b"f"),
        Blocks(blocks=[block.with_certificate(cert)], new_view=nv, sender=0, signature=b"b"),
        Forward(request=Request("bob", 4, b"x", b"y"), sender=2, signature=b"fw"),
    ]


@pytest.mark.parametrize("message", _messages(), ids=lambda m: type(m).__name__)
def test_message_round_trips_through_bytes(message: Message) -> None:
    # Prepare
    data = message.encode()
    # Execute
    decoded = decode_message(data)
    # Assert
    assert type(decoded) is type(message)
    assert decoded.encode() == data
    assert decoded.signed == message.signed


def test_block_round_trips_with_certificate() -> None:
    block = _block().with_certificate(
        CommitCertificate(view=0, height=1, digest=_block().digest, signatures=[(1, b"x")])
    )
    decoded = Block.decode(block.encode())
    assert decoded.digest == block.digest
    assert decoded.certificate is not None and decoded.certificate.signatures == ((1, b"x"),)


def test_block_digest_is_pinned() -> None:
    # A change here changes every chain on disk: it must be deliberate.
    assert (
        _block().digest.hex() == "4614685e15600565720355f2faf55669acdde8ddd60aeb02f2ec44dce7eaf8c7"
    )


def test_request_batch_round_trips_in_order() -> None:
    batch = [Request("b", 2, b"", b""), Request("a", 1, b"\x00" * 5, b"s")]
    assert decode_batch(encode_batch(batch)) == batch


@pytest.mark.parametrize("message", _messages(), ids=lambda m: type(m).__name__)
def test_decode_rejects_every_truncation(message: Message) -> None:
    data = message.encode()
    for cut in range(len(data)):
        with pytest.raises(MalformedMessage):
            decode_message(data[:cut])


def test_decode_rejects_trailing_bytes() -> None:
    with pytest.raises(MalformedMessage, match="trailing"):
        decode_message(_messages()[1].encode() + b"\x00")


def test_decode_rejects_unknown_kind() -> None:
    with pytest.raises(MalformedMessage, match="unknown message kind"):
        decode_message(b"\x63" + _messages()[1].encode()[1:])


def test_decode_rejects_non_bytes() -> None:
    with pytest.raises(MalformedMessage):
        decode_message("not bytes")  # type: ignore[arg-type]


def test_decode_rejects_huge_length_prefix() -> None:
    with pytest.raises(MalformedMessage):
        decode_message(b"\x02\xff\xff\xff\xff")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_decode_of_arbitrary_bytes_only_raises_malformed(data: bytes) -> None:
    with contextlib.suppress(MalformedMessage):
        decode_message(data)


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=400), st.integers(min_value=0, max_value=255))
def test_decode_of_corrupted_message_only_raises_malformed(position: int, value: int) -> None:
    data = bytearray(_messages()[4].encode())
    data[position % len(data)] = value
    with contextlib.suppress(MalformedMessage):
        decode_message(bytes(data))


def test_prepare_and_commit_sign_different_bytes() -> None:
    prepare = Prepare(view=1, height=2, digest=DIGEST, sender=3)
    commit = Commit(view=1, height=2, digest=DIGEST, sender=3)
    assert prepare.signed != commit.signed
    assert prepare.signed.startswith(b"LLBCFL/pbft/v1/PREPARE\x00")
    assert commit.signed.startswith(b"LLBCFL/pbft/v1/COMMIT\x00")


def test_votes_in_different_views_sign_different_bytes() -> None:
    assert (
        Commit(view=1, height=2, digest=DIGEST, sender=3).signed
        != Commit(view=2, height=2, digest=DIGEST, sender=3).signed
    )
