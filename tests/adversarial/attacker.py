"""A Byzantine participant of a live network: raw gRPC, its own Ed25519 signatures.

The attacker holds what a member of a ``network up`` run holds: the genesis
(addresses, public keys, the run's model) and whichever key files it took
from ``RUN_DIR/keys/`` (so it can act as a real client, the server or a
miner), plus keys of its own that no genesis lists. It talks to the nodes on
127.0.0.1 through the generated stubs' method paths, with raw bytes where a
request must be malformed, and signs with PyNaCl over the protocol's
domain-separated bytes (``LLBCFL/v1/<kind>\\0`` + payload, proto/llbcfl.proto),
not through ``node.identity``: forged and Byzantine messages are built as an
outsider would build them. Only the pure encoders that define the wire format
(``chain.records``, ``chain.digests``) are shared with the nodes.

Every call returns an :class:`Outcome` (status code, details, reply) and is
kept in :attr:`Attacker.outcomes`, so a test can check what every refusal
told the caller. Calls are bounded by :data:`CALL_SECONDS`.

Helpers for attacks whose tests come later (PBFT messages and stream headers
authenticated before any work, half-open streams, copies of other clients'
updates): :meth:`Attacker.deliver` sends raw ``PbftMessage`` bytes on
``Miner/Deliver``, :meth:`Attacker.idle_update_streams` holds N
``SubmitUpdate`` streams open without sending, :func:`resigned` re-signs
another client's update stream under a key the attacker holds.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import queue
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import grpc
import numpy as np
import torch
from nacl.signing import SigningKey

from chain.digests import (
    DTYPES,
    NUMPY_DTYPES,
    claim_bytes,
    dtype_name,
    header_bytes,
    raw_bytes,
    weights_digest,
)
from chain.models import initial_spec, initial_weights
from chain.records import (
    Record,
    Registration,
    decode_operation,
    encode_operation,
    record_kind_name,
)
from consensus.ledger import Block, Request
from fl.datasets import dataset_of, load_splits
from fl.models import model_for
from fl.rounds import Federation, record_cap
from fl.seeds import torch_generator
from node.genesis import Genesis, read_genesis
from proto import llbcfl_pb2 as pb

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

CALL_SECONDS: Final = 30.0
ENVELOPE_PREFIX: Final = b"LLBCFL/v1/"
CHUNK_BYTES: Final = 1 << 20
# Large enough to send the oversized messages the nodes must refuse.
CHANNEL_OPTIONS: Final = [("grpc.max_send_message_length", 64 << 20)]


def method(service: str, name: str) -> str:
    return f"/llbcfl.v1.{service}/{name}"


HEALTH_CHECK: Final = "/grpc.health.v1.Health/Check"


# Keys ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Key:
    """An Ed25519 key the attacker signs with, and the node id it uses it as."""

    node_id: str
    signing: SigningKey = field(repr=False)

    @property
    def public_key(self) -> bytes:
        return bytes(self.signing.verify_key)

    def sign(self, kind: str, payload: bytes) -> pb.Envelope:
        """An envelope of ``kind`` over ``payload``: signed over the protocol's tag."""
        signed = ENVELOPE_PREFIX + kind.encode("ascii") + b"\x00" + payload
        signature = self.signing.sign(signed).signature
        return pb.Envelope(kind=kind, payload=payload, signer=self.public_key, signature=signature)

    def sign_record(self, record: Record) -> pb.Envelope:
        """A ``Miner.Submit`` envelope of an on-chain record (canonical bytes of chain.records)."""
        return self.sign(record_kind_name(record), encode_operation(record))


def read_key(path: Path) -> Key:
    """A key file of ``network init`` (TOML: node id and hex seed), as the attacker reads it."""
    doc = tomllib.loads(path.read_text())
    return Key(doc["node_id"], SigningKey(bytes.fromhex(doc["seed"])))


def outsider(name: str) -> Key:
    """A key no genesis lists (derived from ``name``, so runs are reproducible)."""
    return Key(name, SigningKey(hashlib.sha256(b"adversary/" + name.encode()).digest()))


# Outcomes -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What one call got back: a status code and its details, and the reply when OK."""

    code: grpc.StatusCode
    details: str = ""
    reply: Any = None

    @property
    def ok(self) -> bool:
        return self.code == grpc.StatusCode.OK


def _refusal(exc: grpc.RpcError) -> Outcome:
    return Outcome(exc.code(), exc.details() or "")  # type: ignore[attr-defined]


# Tensor streams -----------------------------------------------------------------------


def update_parts(
    key: Key,
    weights: dict[str, torch.Tensor],
    *,
    round: int,
    base_digest: bytes,
    num_samples: int,
    sender_id: str | None = None,
    kind: str = "update",
    chunk_bytes: int = CHUNK_BYTES,
    sign_header: bool = True,
) -> list[pb.TensorStreamPart]:
    """The tensor stream of ``weights``: a header and a trailer's claim that ``key`` signs.

    ``sender_id`` is what the header names (default: the key's node id) and
    ``kind`` the envelope kind of the claim: changing either is an attack, as
    is ``sign_header=False`` (a header with no signature).
    """
    names = sorted(weights)
    data = b"".join(raw_bytes(weights[n]) for n in names)
    sender = key.node_id if sender_id is None else sender_id
    header = pb.TensorStreamHeader(
        round=round,
        sender_id=sender,
        base_digest=base_digest,
        num_samples=num_samples,
        tensors=[
            pb.TensorSpec(name=n, dtype=dtype_name(weights[n]), shape=list(weights[n].shape))
            for n in names
        ],
        total_bytes=len(data),
    )
    if sign_header:
        header.auth.CopyFrom(key.sign(f"{kind}-header", signed_header(header)))
    digest = weights_digest(weights)
    claim = claim_bytes(
        round=round,
        sender_id=sender,
        base_digest=base_digest,
        digest=digest,
        num_samples=num_samples,
    )
    chunks = [
        pb.TensorStreamPart(chunk=pb.TensorChunk(offset=i, data=data[i : i + chunk_bytes]))
        for i in range(0, len(data), chunk_bytes)
    ]
    trailer = pb.TensorStreamTrailer(digest=digest, claim=key.sign(kind, claim))
    return [pb.TensorStreamPart(header=header), *chunks, pb.TensorStreamPart(trailer=trailer)]


def signed_header(header: pb.TensorStreamHeader) -> bytes:
    """The bytes a stream header's signature covers (``chain.digests.header_bytes``)."""
    return header_bytes(
        round=header.round,
        sender_id=header.sender_id,
        base_digest=header.base_digest,
        num_samples=header.num_samples,
        total_bytes=header.total_bytes,
    )


def stream_digest(parts: Sequence[pb.TensorStreamPart]) -> bytes:
    """The digest a stream's trailer states."""
    return bytes(parts[-1].trailer.digest)


def resigned(
    parts: Sequence[pb.TensorStreamPart], key: Key, *, sender_id: str | None = None
) -> list[pb.TensorStreamPart]:
    """``parts`` (someone's update stream) with a claim signed by ``key``.

    The header keeps its sender and signature unless ``sender_id`` is given
    (then the header, signed again by ``key``, and the claim name it): a copy
    of another client's update re-signed as one's own is
    ``resigned(theirs, my_key, sender_id=my_key.node_id)``.
    """
    header = pb.TensorStreamHeader()
    header.CopyFrom(parts[0].header)
    if sender_id is not None:
        header.sender_id = sender_id
        header.auth.CopyFrom(key.sign("update-header", signed_header(header)))
    digest = stream_digest(parts)
    claim = claim_bytes(
        round=header.round,
        sender_id=header.sender_id,
        base_digest=header.base_digest,
        digest=digest,
        num_samples=header.num_samples,
    )
    trailer = pb.TensorStreamTrailer(digest=digest, claim=key.sign("update", claim))
    middle = list(parts[1:-1])
    return [pb.TensorStreamPart(header=header), *middle, pb.TensorStreamPart(trailer=trailer)]


def tensors_of(parts: Sequence[pb.TensorStreamPart]) -> dict[str, torch.Tensor]:
    """The tensors a (well-formed) stream carries, decoded from its header and chunks."""
    header = parts[0].header
    data = b"".join(p.chunk.data for p in parts if p.WhichOneof("part") == "chunk")
    out, offset = {}, 0
    for spec in header.tensors:
        dtype = NUMPY_DTYPES[spec.dtype]
        count = math.prod(spec.shape)
        array = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
        out[spec.name] = torch.from_numpy(array.astype(dtype.newbyteorder("="))).reshape(
            tuple(spec.shape)
        )
        offset += count * dtype.itemsize
    return out


# The attacker ------------------------------------------------------------------------


@dataclass(frozen=True)
class ChainEntry:
    """One request of a committed block, with its decoded record (None: undecodable)."""

    height: int
    request: Request
    record: Record | None


class Attacker:
    """Raw gRPC to the nodes of one run directory, with the keys found in it."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.genesis: Genesis = read_genesis(run_dir / "genesis.toml")
        self.config = self.genesis.run
        self.spec = initial_spec(self.config)
        self.initial_digest = weights_digest(initial_weights(self.config))
        self.outcomes: list[Outcome] = []
        self._recording = True
        self._channels: dict[str, grpc.Channel] = {}

    # Who is who

    def key(self, node_id: str) -> Key:
        """A member's key, taken from the run directory."""
        return read_key(self.run_dir / "keys" / f"{node_id}.key")

    @property
    def miners(self) -> list[str]:
        return [m.node_id for m in self.genesis.membership.miners]

    @property
    def clients(self) -> list[str]:
        return [c.node_id for c in self.genesis.membership.clients]

    @property
    def server(self) -> str:
        return self.genesis.membership.server.node_id

    def channel(self, node_id: str) -> grpc.Channel:
        if node_id not in self._channels:
            address = self.genesis.membership[node_id].address
            assert address.startswith("127.0.0.1:"), address  # attacks stay on this host
            self._channels[node_id] = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        return self._channels[node_id]

    def close(self) -> None:
        for ch in self._channels.values():
            ch.close()
        self._channels.clear()

    # Calls with raw bytes (every RPC: the request need not parse)

    def _record(self, outcome: Outcome) -> Outcome:
        if self._recording:
            self.outcomes.append(outcome)
        return outcome

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """Calls that only read (status, blocks): not attacks, not kept in :attr:`outcomes`."""
        before, self._recording = self._recording, False
        try:
            yield
        finally:
            self._recording = before

    def unary(self, node_id: str, path: str, request: bytes, reply: Any = None) -> Outcome:
        call = self.channel(node_id).unary_unary(
            path, response_deserializer=None if reply is None else reply.FromString
        )
        try:
            return self._record(
                Outcome(grpc.StatusCode.OK, reply=call(request, timeout=CALL_SECONDS))
            )
        except grpc.RpcError as exc:
            return self._record(_refusal(exc))

    def client_stream(
        self, node_id: str, path: str, requests: Iterable[bytes], reply: Any = None
    ) -> Outcome:
        call = self.channel(node_id).stream_unary(
            path, response_deserializer=None if reply is None else reply.FromString
        )
        try:
            answer = call(iter(list(requests)), timeout=CALL_SECONDS)
            return self._record(Outcome(grpc.StatusCode.OK, reply=answer))
        except grpc.RpcError as exc:
            return self._record(_refusal(exc))

    def server_stream(self, node_id: str, path: str, request: bytes, reply: Any = None) -> Outcome:
        call = self.channel(node_id).unary_stream(
            path, response_deserializer=None if reply is None else reply.FromString
        )
        try:
            items = list(call(request, timeout=CALL_SECONDS))
            return self._record(Outcome(grpc.StatusCode.OK, reply=items))
        except grpc.RpcError as exc:
            return self._record(_refusal(exc))

    # The protocol's calls

    def submit(self, miner: str, envelope: pb.Envelope) -> Outcome:
        """``Miner/Submit``: a signed record to be ordered (reply: SubmitReceipt)."""
        request = envelope.SerializeToString()
        return self.unary(miner, method("Miner", "Submit"), request, pb.SubmitReceipt)

    def submit_update(self, miner: str, parts: Iterable[pb.TensorStreamPart]) -> Outcome:
        """``Miner/SubmitUpdate``: a tensor stream (reply: UpdateReceipt)."""
        raw = [p.SerializeToString() for p in parts]
        return self.client_stream(miner, method("Miner", "SubmitUpdate"), raw, pb.UpdateReceipt)

    def submit_update_everywhere(self, parts: Sequence[pb.TensorStreamPart]) -> list[Outcome]:
        """The same stream to every miner at once, as a client uploads (one thread each)."""
        with ThreadPoolExecutor(len(self.miners)) as pool:
            return list(pool.map(lambda m: self.submit_update(m, parts), self.miners))

    def fetch_update(
        self, miner: str, digest: bytes, client: str, key: Key, *, issued_ms: int | None = None
    ) -> Outcome:
        """``Miner/FetchUpdate`` of ``client``'s update ``digest``, a request signed by ``key``
        (kind ``fetch-update``), issued now unless ``issued_ms`` says otherwise."""
        issued = int(time.time() * 1000) if issued_ms is None else issued_ms
        request = pb.FetchUpdateRequest(digest=digest, client_id=client, issued_ms=issued)
        envelope = key.sign("fetch-update", request.SerializeToString())
        path = method("Miner", "FetchUpdate")
        return self.server_stream(miner, path, envelope.SerializeToString(), pb.TensorStreamPart)

    def download_model(self, envelope: pb.Envelope) -> Outcome:
        """``Server/DownloadModel`` with a (signed or forged) model request."""
        path = method("Server", "DownloadModel")
        return self.server_stream(
            self.server, path, envelope.SerializeToString(), pb.TensorStreamPart
        )

    def model_request(self, key: Key, *, round: int, client_id: str | None = None) -> pb.Envelope:
        name = key.node_id if client_id is None else client_id
        payload = pb.ModelRequest(round=round, client_id=name).SerializeToString()
        return key.sign("model-request", payload)

    def attend(self, entries: Sequence[pb.Envelope]) -> Outcome:
        """``Server/Attend`` with these (signed or forged) attendances: a refusal, or
        the notices the stream carried until the call's deadline."""
        request = pb.AttendRequest(clients=list(entries)).SerializeToString()
        return self.server_stream(self.server, method("Server", "Attend"), request, pb.RoundCall)

    def attendance(
        self,
        key: Key,
        *,
        client_id: str | None = None,
        time_ms: int | None = None,
        network: bytes | None = None,
    ) -> pb.Envelope:
        """An ``attend`` envelope signed by ``key`` (its own id, now, this network by default)."""
        payload = pb.Attendance(
            client_id=key.node_id if client_id is None else client_id,
            genesis_digest=self.genesis.digest if network is None else network,
            time_ms=int(time.time() * 1000) if time_ms is None else time_ms,
        )
        return key.sign("attend", payload.SerializeToString())

    def status(self, node_id: str) -> pb.NodeStatus | None:
        """``Node/Status`` (None while the node does not answer)."""
        with self.reading():
            outcome = self.unary(node_id, method("Node", "Status"), b"", pb.NodeStatus)
        return outcome.reply if outcome.ok else None

    def health_check(self, node_id: str, request: bytes = b"") -> Outcome:
        from grpc_health.v1 import health_pb2

        return self.unary(node_id, HEALTH_CHECK, request, health_pb2.HealthCheckResponse)

    def deliver(self, miner: str, messages: Iterable[bytes], key: Key | None = None) -> Outcome:
        """``Miner/Deliver``: PBFT messages as given (``consensus.messages`` bytes or not).

        With ``key`` (a miner's), each item carries its link signature (kind
        ``pbft-wire`` over SHA-256 of the bytes); without, none.
        """
        items = [pb.PbftMessage(data=m) for m in messages]
        if key is not None:
            for item in items:
                item.auth.CopyFrom(key.sign("pbft-wire", hashlib.sha256(item.data).digest()))
        raw = [item.SerializeToString() for item in items]
        return self.client_stream(miner, method("Miner", "Deliver"), raw, pb.Ack)

    @contextlib.contextmanager
    def idle_update_streams(self, miner: str, count: int) -> Iterator[list[grpc.Future]]:
        """``count`` ``SubmitUpdate`` streams that send nothing, cancelled on exit."""
        call = self.channel(miner).stream_unary(method("Miner", "SubmitUpdate"))
        gates: list[queue.Queue] = [queue.Queue() for _ in range(count)]

        def silent(gate: queue.Queue) -> Iterator[bytes]:
            gate.get()  # blocks until the streams are released
            yield from ()

        futures = [call.future(silent(g), timeout=CALL_SECONDS * 4) for g in gates]
        try:
            yield futures
        finally:
            for gate, future in zip(gates, futures, strict=True):
                future.cancel()
                gate.put(None)

    # Reading the chain

    def blocks(self, miner: str) -> list[Block] | None:
        """Certified blocks from ``miner`` (``Miner/FetchBlocks``), decoded; None while it
        does not answer."""
        request = pb.FetchBlocksRequest(from_height=1).SerializeToString()
        with self.reading():
            outcome = self.server_stream(
                miner, method("Miner", "FetchBlocks"), request, pb.BlockBytes
            )
        if not outcome.ok:
            return None
        return [Block.decode(bytes(b.block)) for b in outcome.reply]

    def chain(self, miner: str) -> list[ChainEntry]:
        """Every request on ``miner``'s chain (empty while it does not answer)."""
        return chain_entries(self.blocks(miner) or [])


def chain_entries(blocks: Iterable[Block]) -> list[ChainEntry]:
    """Every request of ``blocks`` in order, with its record."""
    entries = []
    for block in blocks:
        for request in block.requests():
            try:
                record: Record | None = decode_operation(request.operation)[1]
            except ValueError:
                record = None
            entries.append(ChainEntry(block.height, request, record))
    return entries


def random_weights(spec: Any, *, seed: int, scale: float = 0.01) -> dict[str, torch.Tensor]:
    """Tensors of the run's model shapes, seeded (each seed gives another digest)."""
    gen = torch.Generator().manual_seed(seed)
    return {
        name: (torch.randn(tuple(shape), generator=gen, dtype=torch.float64) * scale).to(
            DTYPES[dtype]
        )
        for name, (dtype, shape) in spec.items()
    }


# A Byzantine client ---------------------------------------------------------------------

MODEL_SECONDS: Final = 120.0


def cap_histogram(config: Any) -> tuple[int, ...]:
    """A registration claiming the record cap exactly (the largest claim the chain admits),
    spread over every class, with no invalid label."""
    classes = dataset_of(config).num_classes
    q, r = divmod(record_cap(config), classes)
    return (*([q + 1] * r), *([q] * (classes - r)), 0)


class ByzantineClient:
    """A real client identity run by the attacker: its own claims, honest training.

    It registers what the attacker chooses; when selected it downloads the
    round's model as that client (``Server/DownloadModel``, signed with the
    client's key from the run directory), trains on the client's real shard
    with ``fl.rounds.ClientState.participate`` (the computation the client's
    own process would make) and builds the update stream with the sample
    count its registration claims.
    """

    def __init__(self, attacker: Attacker, client_id: str, *, mnist_root: Path) -> None:
        self.attacker = attacker
        self.key = attacker.key(client_id)
        config = attacker.config
        splits = load_splits(config, data_dir=str(mnist_root), train=True)
        self.state = Federation.create(config, splits.train, only={client_id}).client(client_id)
        self.model_object = model_for(config, generator=torch_generator(0, "scratch"))

    @property
    def client_id(self) -> str:
        return self.key.node_id

    def registration(self, histogram: Sequence[int]) -> pb.Envelope:
        """Its registration envelope; later updates claim what ``histogram`` adds up to."""
        self.state.histogram = tuple(histogram)
        return self.key.sign_record(Registration(self.client_id, tuple(histogram)))

    def model(
        self, rnd: int, *, timeout: float = MODEL_SECONDS
    ) -> tuple[dict[str, torch.Tensor], bytes]:
        """Round ``rnd``'s model as the server hands it out (asked until the server has it)."""
        request = self.attacker.model_request(self.key, round=rnd)
        deadline = time.monotonic() + timeout
        while True:
            with self.attacker.reading():
                outcome = self.attacker.download_model(request)
            if outcome.ok:
                weights = tensors_of(outcome.reply)
                return weights, weights_digest(weights)
            if time.monotonic() > deadline:
                raise AssertionError(f"round {rnd}'s model: {outcome.code.name} {outcome.details}")
            time.sleep(0.1)  # polling the server until it opens the round (bounded)

    def update(
        self, rnd: int, weights: dict[str, torch.Tensor], digest: bytes
    ) -> list[pb.TensorStreamPart]:
        """The trained update of round ``rnd`` from ``weights``, as a signed stream."""
        trained = self.state.participate(
            self.model_object, weights, round=rnd, config=self.attacker.config
        )
        assert trained is not None
        return update_parts(
            self.key,
            dict(trained.delta),
            round=rnd,
            base_digest=digest,
            num_samples=trained.n_samples,
        )
