"""Tensor streams: exact round trips, chunk bounds, and every rejection with its code."""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict

import grpc
import pytest
import torch

from chain.digests import model_spec, weights_digest
from fl.models import build_model
from fl.weights import get_weights
from node.identity import Identity
from node.tensor_receiver import TensorStreamReceiver, UpdateRejected, receive_tensor_stream
from node.tensors import (
    CHUNK_BYTES,
    MODEL_KIND,
    UPDATE_KIND,
    relay_stream,
    sign_header,
    tensor_stream,
)
from proto import llbcfl_pb2 as pb

LIMIT = 64 << 20
BASE = bytes(range(32))
Code = grpc.StatusCode


@pytest.fixture(scope="module")
def cnn():
    return get_weights(build_model("cnn", generator=torch.Generator().manual_seed(0)))


def small_weights():
    return OrderedDict(
        [
            ("w", torch.arange(12, dtype=torch.float32).reshape(3, 4) / 7),
            ("b", torch.tensor([0.5, -1.25], dtype=torch.float32)),
        ]
    )


def update_parts(identities, weights, *, sender="client-000", kind=UPDATE_KIND, **kwargs):
    options = {"round": 3, "base_digest": BASE, "num_samples": 600, **kwargs}
    return list(tensor_stream(weights, identity=identities[sender], kind=kind, **options))


def receive(parts, membership, weights, *, kind=UPDATE_KIND, **limits):
    return receive_tensor_stream(
        parts,
        expected=model_spec(weights),
        membership=membership,
        kind=kind,
        max_total_bytes=limits.pop("max_total_bytes", LIMIT),
        **limits,
    )


def rejection(parts, membership, weights, **options):
    with pytest.raises(UpdateRejected) as info:
        receive(parts, membership, weights, **options)
    return info.value


def test_cnn_state_dict_round_trips_bit_for_bit(identities, membership, cnn):
    # Prepare
    parts = update_parts(identities, cnn)
    # Execute
    received = receive(parts, membership, cnn)
    # Assert
    assert list(received.weights) == list(cnn)
    for name, tensor in cnn.items():
        got = received.weights[name]
        assert got.dtype == torch.float32 and got.shape == tensor.shape
        assert torch.equal(got.view(torch.int32), tensor.view(torch.int32)), name
    assert received.digest == weights_digest(cnn)
    assert (received.round, received.num_samples, received.base_digest) == (3, 600, BASE)
    assert received.sender.node_id == "client-000"


def test_mixed_dtypes_and_empty_tensors_round_trip(identities, membership):
    # Prepare
    weights = OrderedDict(
        [
            ("f64", torch.tensor([1e-300, -2.5], dtype=torch.float64)),
            ("f16", torch.tensor([[0.5, 65504.0]], dtype=torch.float16)),
            ("i64", torch.tensor([-(2**62), 7])),
            ("mask", torch.tensor([True, False, True])),
            ("empty", torch.zeros(0, 3)),
        ]
    )
    # Execute
    received = receive(update_parts(identities, weights), membership, weights)
    # Assert
    for name, tensor in weights.items():
        assert received.weights[name].dtype == tensor.dtype
        assert torch.equal(received.weights[name], tensor), name


def test_server_model_stream_is_accepted_as_a_model(identities, membership, cnn):
    # Prepare
    parts = update_parts(identities, cnn, sender="server", kind=MODEL_KIND, base_digest=b"")
    # Execute
    received = receive(parts, membership, cnn, kind=MODEL_KIND)
    # Assert
    assert received.sender.role == "server"


def test_chunks_never_exceed_the_chunk_size(identities):
    # Prepare: 3 MiB + 20 bytes of data
    weights = {"big": torch.ones(3 * (1 << 18) + 5)}
    # Execute
    default = update_parts(identities, weights)
    small = update_parts(identities, weights, chunk_bytes=1000)
    # Assert
    sizes = [len(p.chunk.data) for p in default if p.WhichOneof("part") == "chunk"]
    assert sizes == [CHUNK_BYTES] * 3 + [20]
    assert max(len(p.chunk.data) for p in small if p.WhichOneof("part") == "chunk") == 1000
    assert all(p.ByteSize() < CHUNK_BYTES + 64 for p in default)


def test_chunk_size_above_one_mib_is_refused(identities):
    with pytest.raises(ValueError, match="chunk_bytes"):
        update_parts(identities, small_weights(), chunk_bytes=CHUNK_BYTES + 1)


def test_digest_is_canonical():
    # Prepare
    weights = small_weights()
    reordered = OrderedDict(reversed(list(weights.items())))
    one_bit = small_weights()
    one_bit["b"].view(torch.int32)[0] ^= 1
    renamed = OrderedDict([("w", weights["w"]), ("c", weights["b"])])
    reshaped = OrderedDict([("w", weights["w"].reshape(4, 3)), ("b", weights["b"])])
    # Execute
    digest = weights_digest(weights)
    # Assert
    assert digest == weights_digest(reordered)
    assert digest.hex() == "882a01f723cb86daac8e81abb16129b91615473fad401d543e21d9253f35065b"
    for other in (one_bit, renamed, reshaped):
        assert weights_digest(other) != digest


def _record(name, dtype, shape, raw):
    text = b"".join(struct.pack(">I", len(s)) + s.encode() for s in (name, dtype))
    dims = struct.pack(">I", len(shape)) + b"".join(struct.pack(">Q", d) for d in shape)
    return text + dims + struct.pack(">Q", len(raw)) + raw


def test_digest_covers_the_documented_canonical_bytes():
    # Prepare: tag, count, then per tensor in name order: name, dtype, shape, raw LE bytes
    w = small_weights()["w"]
    canonical = (
        b"LLBCFL/tensors/v1\x00"
        + struct.pack(">I", 2)
        + _record("b", "float32", (2,), struct.pack("<2f", 0.5, -1.25))
        + _record("w", "float32", (3, 4), struct.pack("<12f", *w.flatten().tolist()))
    )
    # Execute
    digest = weights_digest(small_weights())
    # Assert
    assert digest == hashlib.sha256(canonical).digest()


def test_relayed_stream_is_identical_and_still_verifies(identities, membership, cnn):
    # Prepare
    parts = update_parts(identities, cnn, chunk_bytes=10_000)
    received = receive(parts, membership, cnn)
    # Execute
    relayed = list(relay_stream(received, chunk_bytes=10_000))
    # Assert
    assert [p.SerializeToString() for p in relayed] == [p.SerializeToString() for p in parts]
    assert receive(relayed, membership, cnn).digest == received.digest


# Malformed streams ------------------------------------------------------------


def _chunk_indices(parts):
    return [i for i, p in enumerate(parts) if p.WhichOneof("part") == "chunk"]


def _small_stream(identities):
    return update_parts(identities, small_weights(), chunk_bytes=16)


def test_truncated_stream_is_rejected(identities, membership):
    # Prepare: the last chunk is lost
    parts = _small_stream(identities)
    del parts[_chunk_indices(parts)[-1]]
    # Execute
    error = rejection(parts, membership, small_weights())
    # Assert
    assert error.code == Code.INVALID_ARGUMENT and "truncated" in error.reason


def test_stream_without_trailer_is_rejected(identities, membership):
    # Prepare
    parts = _small_stream(identities)[:-1]
    # Execute
    error = rejection(parts, membership, small_weights())
    # Assert
    assert error.code == Code.INVALID_ARGUMENT and "without a trailer" in error.reason


def test_extra_chunk_is_rejected(identities, membership):
    # Prepare: one more chunk after the declared total
    parts = _small_stream(identities)
    total = parts[0].header.total_bytes
    parts.insert(-1, pb.TensorStreamPart(chunk=pb.TensorChunk(offset=total, data=b"\0" * 4)))
    # Execute
    error = rejection(parts, membership, small_weights())
    # Assert
    assert error.code == Code.INVALID_ARGUMENT and "past the declared" in error.reason


def test_anything_after_the_trailer_is_rejected(identities, membership):
    # Prepare
    parts = _small_stream(identities)
    parts.append(parts[1])
    # Execute
    error = rejection(parts, membership, small_weights())
    # Assert
    assert error.code == Code.INVALID_ARGUMENT and "after the trailer" in error.reason


def test_reordered_chunks_are_rejected(identities, membership):
    # Prepare
    parts = _small_stream(identities)
    first, second = _chunk_indices(parts)[:2]
    parts[first], parts[second] = parts[second], parts[first]
    # Execute
    error = rejection(parts, membership, small_weights())
    # Assert
    assert error.code == Code.INVALID_ARGUMENT and "offset" in error.reason


def test_stream_must_start_with_a_header(identities, membership):
    # Prepare
    parts = _small_stream(identities)[1:]
    # Execute
    error = rejection(parts, membership, small_weights())
    # Assert
    assert error.code == Code.INVALID_ARGUMENT and "not a header" in error.reason


def test_wrong_shape_is_rejected(identities, membership):
    # Prepare: the receiver's model has a (4, 3) tensor where the sender has (3, 4)
    sent = small_weights()
    expected = OrderedDict([("w", sent["w"].reshape(4, 3)), ("b", sent["b"])])
    # Execute
    error = rejection(update_parts(identities, sent), membership, expected)
    # Assert
    assert error.code == Code.INVALID_ARGUMENT and "expected float32 [4, 3]" in error.reason


def test_wrong_dtype_is_rejected(identities, membership):
    # Prepare
    sent = OrderedDict((name, t.double()) for name, t in small_weights().items())
    # Execute
    error = rejection(update_parts(identities, sent), membership, small_weights())
    # Assert
    assert error.code == Code.INVALID_ARGUMENT and "got float64" in error.reason


def test_missing_tensor_is_rejected(identities, membership):
    # Prepare
    sent = OrderedDict([("w", small_weights()["w"])])
    # Execute
    error = rejection(update_parts(identities, sent), membership, small_weights())
    # Assert
    assert error.code == Code.INVALID_ARGUMENT and "missing ['b']" in error.reason


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_are_rejected_and_attributed(identities, membership, bad):
    # Prepare
    sent = small_weights()
    sent["w"][1, 2] = bad
    # Execute
    error = rejection(update_parts(identities, sent), membership, small_weights())
    # Assert
    assert error.code == Code.INVALID_ARGUMENT and "tensor w has NaN or infinite" in error.reason
    assert error.sender == "client-000"


def test_oversized_stream_is_rejected_before_allocating(identities, membership):
    # Prepare: a member's signed header claiming a terabyte (allocating it would fail loudly)
    parts = _small_stream(identities)
    parts[0].header.total_bytes = 1 << 40
    sign_header(parts[0].header, identities["client-000"], UPDATE_KIND)
    # Execute
    error = rejection(parts, membership, small_weights())
    # Assert
    assert error.code == Code.RESOURCE_EXHAUSTED and "limit" in error.reason


@pytest.mark.parametrize("signer", [None, "outsider"])
def test_unsigned_or_outsider_header_is_refused_before_any_check_or_allocation(
    identities, membership, signer
):
    # Prepare: a terabyte header, unsigned or signed by a key outside the genesis
    parts = _small_stream(identities)
    header = parts[0].header
    header.total_bytes = 1 << 40
    header.ClearField("auth")
    if signer is not None:
        sign_header(header, Identity.generate(node_id="client-000", role="client"), UPDATE_KIND)
    receiver = TensorStreamReceiver(
        expected=model_spec(small_weights()),
        max_total_bytes=LIMIT,
        membership=membership,
        kind=UPDATE_KIND,
    )
    # Execute
    with pytest.raises(UpdateRejected) as info:
        receiver.add(parts[0])
    # Assert: refused as unauthenticated, nothing reserved
    assert info.value.code == Code.UNAUTHENTICATED and "stream header" in info.value.reason
    assert receiver.header is None and receiver.signer is None


def test_header_signed_by_another_role_is_refused(identities, membership):
    # Prepare: the server signs an update header
    parts = _small_stream(identities)
    parts[0].header.sender_id = "server"
    sign_header(parts[0].header, identities["server"], UPDATE_KIND)
    # Execute
    error = rejection(parts, membership, small_weights())
    # Assert
    assert error.code == Code.PERMISSION_DENIED


def test_admit_runs_after_the_signature_and_before_allocation(identities, membership):
    # Prepare: the caller refuses every sender
    seen = []

    def admit(header, signer):
        seen.append(signer.node_id)
        raise UpdateRejected(Code.PERMISSION_DENIED, "not now")

    receiver = TensorStreamReceiver(
        expected=model_spec(small_weights()),
        max_total_bytes=LIMIT,
        membership=membership,
        kind=UPDATE_KIND,
        admit=admit,
    )
    # Execute
    with pytest.raises(UpdateRejected):
        receiver.add(_small_stream(identities)[0])
    # Assert: admit saw the verified signer; nothing was reserved
    assert seen == ["client-000"] and receiver.header is None


def test_model_larger_than_the_limit_is_rejected(identities, membership, cnn):
    # Execute
    error = rejection(update_parts(identities, cnn), membership, cnn, max_total_bytes=1000)
    # Assert
    assert error.code == Code.RESOURCE_EXHAUSTED


def test_oversized_chunk_is_rejected(identities, membership):
    # Prepare
    parts = update_parts(identities, small_weights(), chunk_bytes=40)
    # Execute
    error = rejection(parts, membership, small_weights(), max_chunk_bytes=16)
    # Assert
    assert error.code == Code.RESOURCE_EXHAUSTED and "chunk of 40 bytes" in error.reason


def test_tampered_data_fails_the_digest_check(identities, membership):
    # Prepare: one byte changed in transit
    parts = _small_stream(identities)
    chunk = parts[_chunk_indices(parts)[0]].chunk
    chunk.data = bytes([chunk.data[0] ^ 1]) + chunk.data[1:]
    # Execute
    error = rejection(parts, membership, small_weights())
    # Assert
    assert error.code == Code.INVALID_ARGUMENT and "digest mismatch" in error.reason


def test_tampered_data_with_recomputed_digest_fails_the_signature(identities, membership):
    # Prepare: the attacker replaces the data and the digest, not the signature
    honest = small_weights()
    forged = small_weights()
    forged["b"][0] = 100.0
    parts = update_parts(identities, forged)
    parts[-1].trailer.claim.CopyFrom(update_parts(identities, honest)[-1].trailer.claim)
    # Execute
    error = rejection(parts, membership, honest)
    # Assert
    assert error.code == Code.UNAUTHENTICATED and "claim does not match" in error.reason


def test_forged_signature_is_rejected(identities, membership):
    # Prepare
    parts = _small_stream(identities)
    claim = parts[-1].trailer.claim
    claim.signature = bytes([claim.signature[0] ^ 4]) + claim.signature[1:]
    # Execute
    error = rejection(parts, membership, small_weights())
    # Assert
    assert error.code == Code.UNAUTHENTICATED and "bad 'update' signature" in error.reason


def test_key_outside_the_membership_is_rejected(membership):
    # Prepare: a stranger using a member's id
    stranger = {"client-000": Identity(node_id="client-000", role="client", seed=bytes(32))}
    parts = update_parts(stranger, small_weights())
    # Execute
    error = rejection(parts, membership, small_weights())
    # Assert
    assert error.code == Code.UNAUTHENTICATED and "not a member" in error.reason


def test_update_from_a_miner_is_rejected(identities, membership):
    # Execute
    error = rejection(
        update_parts(identities, small_weights(), sender="miner-1"), membership, small_weights()
    )
    # Assert
    assert error.code == Code.PERMISSION_DENIED and "miner-1 is a miner" in error.reason


def test_client_cannot_sign_for_another_client(identities, membership):
    # Prepare: client-001 signs a stream that says it comes from client-000
    parts = update_parts(identities, small_weights(), sender="client-001")
    parts[0].header.sender_id = "client-000"
    # Execute
    error = rejection(parts, membership, small_weights())
    # Assert
    assert error.code == Code.PERMISSION_DENIED and "signer client-001" in error.reason


def test_stream_replayed_in_another_round_is_rejected_at_its_header(identities, membership):
    # Prepare: someone else's round-3 update re-sent with a round-4 header
    parts = _small_stream(identities)
    parts[0].header.round = 4
    # Execute
    error = rejection(parts, membership, small_weights())
    # Assert
    assert error.code == Code.UNAUTHENTICATED and "does not cover" in error.reason


def test_claim_of_another_round_is_rejected(identities, membership):
    # Prepare: the client re-signs the header for round 4 but keeps its round-3 claim
    parts = _small_stream(identities)
    parts[0].header.round = 4
    sign_header(parts[0].header, identities["client-000"], UPDATE_KIND)
    # Execute
    error = rejection(parts, membership, small_weights())
    # Assert
    assert error.code == Code.UNAUTHENTICATED and "claim does not match" in error.reason


def _with_claim(parts, claim):
    trailer = pb.TensorStreamTrailer(digest=parts[-1].trailer.digest, claim=claim)
    return [*parts[:-1], pb.TensorStreamPart(trailer=trailer)]


def test_signature_of_another_kind_is_not_an_update(identities, membership):
    # Prepare: the same claim bytes signed as a "start-round" message, sent as is
    # and with its kind field rewritten to "update"
    parts = _small_stream(identities)
    other = identities["client-000"].sign("start-round", parts[-1].trailer.claim.payload)
    relabelled = pb.Envelope()
    relabelled.CopyFrom(other)
    relabelled.kind = UPDATE_KIND
    # Execute
    as_is = rejection(_with_claim(parts, other), membership, small_weights())
    renamed = rejection(_with_claim(parts, relabelled), membership, small_weights())
    # Assert
    assert as_is.code == Code.UNAUTHENTICATED and "expected a 'update'" in as_is.reason
    assert renamed.code == Code.UNAUTHENTICATED and "bad 'update' signature" in renamed.reason


def test_receiver_exposes_the_header_before_the_data(identities, membership):
    # Prepare: a servicer can check round and sender before reading any chunk
    parts = _small_stream(identities)
    receiver = TensorStreamReceiver(
        expected=model_spec(small_weights()),
        max_total_bytes=LIMIT,
        membership=membership,
        kind=UPDATE_KIND,
    )
    # Execute
    receiver.add(parts[0])
    # Assert
    assert receiver.header is not None and receiver.header.sender_id == "client-000"
