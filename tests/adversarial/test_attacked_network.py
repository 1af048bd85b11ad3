"""Attacks on one shared live network: each refused with the right status, nothing stored.

One ``network up`` run (4 miners, 3 clients in a process each, tiny MLP,
``paper`` selection of 2 clients per round, 2 rounds) is attacked from this
test process (tests/adversarial/attacker.py), which took the run's key files.
The process of client-002 is frozen (SIGSTOP) as soon as it exists, and the
attacker acts as client-002 instead, a Byzantine client with a real key. The
network waits for client-002's registration, which is the window of the
registration attacks; client-002 registers the record cap (the largest claim
the chain admits), which makes it the top candidate of Algorithm 1, and each
round it is selected in stays open until the attacker uploads for it (the
60 s round deadline only bounds a failure), which is the window of the round
attacks. Refusal codes are those of ``node.errors`` (the one table of
``node.errors.status_of``) and ``node.tensor_receiver``.

The tests follow the run, in file order:

* registering: a registration carrying a DP plan of its own, claiming 10^9
  records or more than the record cap, or in another's name (findings 1, 2);
* round 1 open: 300 identical re-registrations and a different one (finding
  9); updates with forged or wrong-role signatures, from an unselected
  client, for another round, a second one, NaN or infinite values, another
  base model or sample count, malformed streams; garbage, empty, truncated
  and oversized protobufs on every RPC; model requests; start-round notices;
  records out of turn; empty health checks;
* round 2 open: replays of round 1's updates, records and model request; the
  aggregate gives client-002's inflated claim twice the round's median weight
  (finding 2);
* the end: the run finishes (``network up`` exits 0), every miner holds the
  same head, ``chain verify`` passes on every chain, nothing an attack sent is
  on a chain or in a blob store, and no node logged a traceback.
"""

from __future__ import annotations

import hashlib
import math
import re
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2

from chain.records import (
    Registration,
    RoundSummary,
    RoundVerdicts,
    Selection,
    encode_operation,
    pack_f64,
    record_kind_name,
)
from commands.chaintools import read_blocks
from consensus.canonical import pack_u64
from consensus.ledger import GENESIS_HASH, Block, BlockHeader, Request, encode_batch
from consensus.messages import PrePrepare
from fl.datasets import dataset_of
from fl.rounds import record_cap
from node.serving import STREAM_IDLE_SECONDS
from proto import llbcfl_pb2 as pb
from tests.adversarial.attacker import (
    HEALTH_CHECK,
    Attacker,
    ByzantineClient,
    ChainEntry,
    Key,
    Outcome,
    cap_histogram,
    chain_entries,
    method,
    outsider,
    random_weights,
    resigned,
    signed_header,
    stream_digest,
    tensors_of,
    update_parts,
)
from tests.adversarial.live import LiveNetwork, running, wait_until

Code = grpc.StatusCode
OPTIONS: dict[str, Any] = {
    "model": "mlp",
    "train_size": 1500,
    "clients": 3,
    "frac": 0.67,  # 2 of 3 clients per round
    "rounds": 2,
    "val_size": 200,
    "test_size": 500,
    "selection": "paper",  # top-N: the record cap's claim makes client-002 the first
    "miners": 4,
    "client_procs": 3,
    "round_deadline": 60,
    "timeout": 420,
}
BYZANTINE = "client-002"
BYZANTINE_PROCESS = "clients-2"  # network up puts client k in process clients-k here
WAIT = 120.0  # bound of every wait on the network (seconds)
# What a refusal may never tell the caller: the node's internals.
INTERNAL_TEXT = ("Traceback", 'File "', ".py", "<class '", "Unexpected ", "Exception")


# The network and the attacker ---------------------------------------------------------


@pytest.fixture(scope="module")
def network(tmp_path_factory: pytest.TempPathFactory, mnist_root: Path) -> Iterator[LiveNetwork]:
    run_dir = tmp_path_factory.mktemp("attacked") / "run"
    with running(
        run_dir, mnist_root=mnist_root, options=OPTIONS, freeze=(BYZANTINE_PROCESS,)
    ) as net:
        yield net


@pytest.fixture(scope="module")
def byzantine(attacker: Attacker, mnist_root: Path) -> ByzantineClient:
    return ByzantineClient(attacker, BYZANTINE, mnist_root=mnist_root)


@pytest.fixture(scope="module")
def refused_digests() -> set[bytes]:
    """Digests of every update stream an attack sent: none may be stored or on a chain."""
    return set()


def process_of(client: str) -> str:
    return f"clients-{int(client.split('-')[1])}"


def node_log(network: LiveNetwork, node_id: str) -> Path:
    folder = process_of(node_id) if node_id.startswith("client-") else node_id
    return network.run_dir / folder / "log"


def records_of(attacker: Attacker, miner: str, kind: type) -> list[Any]:
    return [e.record for e in attacker.chain(miner) if isinstance(e.record, kind)]


def on_every_miner(attacker: Attacker, find: Any) -> Any:
    """``find(miner)`` once it is truthy and equal on every miner, else None."""
    found = [find(m) for m in attacker.miners]
    return found[0] if found[0] and all(f == found[0] for f in found) else None


def selection_of(attacker: Attacker, rnd: int) -> Any:
    def find(miner: str) -> Selection | None:
        return next((s for s in records_of(attacker, miner, Selection) if s.round == rnd), None)

    return on_every_miner(attacker, find)


def verdicts_of(attacker: Attacker, rnd: int) -> Any:
    def find(miner: str) -> RoundVerdicts | None:
        records = records_of(attacker, miner, RoundVerdicts)
        return next((v for v in records if v.round == rnd), None)

    return on_every_miner(attacker, find)


def registrations(attacker: Attacker, miner: str) -> list[Registration]:
    return records_of(attacker, miner, Registration)


def stored_at(network: LiveNetwork, attacker: Attacker, digest: bytes) -> list[str]:
    """Miners holding a blob of ``digest`` (``RUN_DIR/<miner>/blobs/<digest hex>-<client>.bin``)."""
    return [
        m for m in attacker.miners if list((network.run_dir / m / "blobs").glob(f"{digest.hex()}*"))
    ]


def leaks(outcome: Outcome) -> bool:
    return any(text in outcome.details for text in INTERNAL_TEXT)


def assert_refused(outcomes: list[Outcome], code: grpc.StatusCode) -> None:
    """Every outcome is ``code``, and its details tell nothing internal."""
    got = [(o.code.name, o.details) for o in outcomes]
    assert all(o.code == code for o in outcomes), got
    assert not any(leaks(o) for o in outcomes), got


# Registering: client-002 not yet registered ---------------------------------------------


@pytest.fixture(scope="module")
def registering(attacker: Attacker) -> Attacker:
    """The network waiting for client-002: the honest registrations on every miner."""
    honest = {c for c in attacker.clients if c != BYZANTINE}
    wait_until(
        lambda: (
            on_every_miner(
                attacker, lambda m: {r.client for r in registrations(attacker, m)} or None
            )
            == honest
        ),
        timeout=WAIT,
        what="the honest clients' registrations on every miner",
    )
    return attacker


def submit_everywhere(attacker: Attacker, envelope: pb.Envelope) -> list[Outcome]:
    return [attacker.submit(m, envelope) for m in attacker.miners]


def registered_anywhere(attacker: Attacker, client: str) -> list[str]:
    return [
        m for m in attacker.miners if any(r.client == client for r in registrations(attacker, m))
    ]


PLANS = {
    "noise 0": (0.0, 5),
    "negative noise": (-1.0, 5),
    "NaN noise": (math.nan, 5),
    "0 steps": (1.0, 0),
}


@pytest.mark.parametrize("plan", list(PLANS.values()), ids=list(PLANS))
def test_a_registration_carrying_its_own_dp_plan_is_refused(
    registering: Attacker, plan: tuple[float, int]
) -> None:
    # Prepare: client-002's registration followed by a DP plan of its own (sample
    # rate, steps, noise), the fields registrations carried before the plan came
    # from the genesis alone (finding 1)
    attacker, (noise, steps) = registering, plan
    record = Registration(BYZANTINE, cap_histogram(attacker.config))
    operation = encode_operation(record) + pack_f64(0.5) + pack_u64(steps) + pack_f64(noise)
    envelope = attacker.key(BYZANTINE).sign("chain-register", operation)
    # Execute
    outcomes = submit_everywhere(attacker, envelope)
    # Assert: malformed record, on every miner; client-002 is still unregistered (the
    # same registration without the plan is accepted: the fixture `registered`)
    assert_refused(outcomes, Code.INVALID_ARGUMENT)
    assert registered_anywhere(attacker, BYZANTINE) == []


def claimed_histogram(config: Any, claim: str) -> tuple[int, ...]:
    cap, classes = record_cap(config), dataset_of(config).num_classes
    return {
        "10^9 records in one class": (10**9, *([0] * classes)),
        "10^9 records over every class": (*([10**8] * classes), 0),
        "10^9 in a class offset by negative counts": (10**9, -(10**9), *([100] * (classes - 1))),
        "one record over the cap": (cap + 1, *([0] * classes)),
    }[claim]


CLAIMS = [
    "10^9 records in one class",
    "10^9 records over every class",
    "10^9 in a class offset by negative counts",
    "one record over the cap",
]


@pytest.mark.parametrize("claim", CLAIMS)
def test_a_registration_claiming_more_than_the_record_cap_is_refused(
    registering: Attacker, claim: str
) -> None:
    # Prepare (finding 2)
    attacker = registering
    histogram = claimed_histogram(attacker.config, claim)
    envelope = attacker.key(BYZANTINE).sign_record(Registration(BYZANTINE, histogram))
    # Execute
    outcomes = submit_everywhere(attacker, envelope)
    # Assert: not valid on the chain (chain.admission), nowhere registered
    assert_refused(outcomes, Code.FAILED_PRECONDITION)
    assert all("record cap" in o.details for o in outcomes), outcomes
    assert registered_anywhere(attacker, BYZANTINE) == []


def test_a_registration_in_another_name_or_by_another_role_is_refused(
    registering: Attacker,
) -> None:
    # Prepare
    attacker = registering
    histogram = cap_histogram(attacker.config)
    as_other = attacker.key(BYZANTINE).sign_record(Registration("client-000", histogram))
    by_server = attacker.key(attacker.server).sign_record(Registration(BYZANTINE, histogram))
    by_outsider = outsider("mallory").sign_record(Registration(BYZANTINE, histogram))
    again_other = attacker.key("client-000").sign_record(Registration(BYZANTINE, histogram))
    # Execute / Assert
    assert_refused(submit_everywhere(attacker, as_other), Code.FAILED_PRECONDITION)
    assert_refused(submit_everywhere(attacker, by_server), Code.PERMISSION_DENIED)
    assert_refused(submit_everywhere(attacker, by_outsider), Code.UNAUTHENTICATED)
    # client-000's one registration timestamp is used: whatever it registers now
    assert_refused(submit_everywhere(attacker, again_other), Code.ALREADY_EXISTS)
    assert registered_anywhere(attacker, BYZANTINE) == []


# client-002 registers the record cap; round 1 opens ---------------------------------------


@dataclass
class Registered:
    envelope: pb.Envelope
    first: Outcome
    again: Outcome  # the same envelope at once: pending or executed


@pytest.fixture(scope="module")
def registered(registering: Attacker, byzantine: ByzantineClient) -> Registered:
    attacker = registering
    envelope = byzantine.registration(cap_histogram(attacker.config))
    first = attacker.submit(attacker.miners[0], envelope)
    again = attacker.submit(attacker.miners[0], envelope)
    assert first.ok and first.reply.accepted, first
    wait_until(
        lambda: len(registered_anywhere(attacker, BYZANTINE)) == len(attacker.miners),
        timeout=WAIT,
        what="client-002's registration on every miner",
    )
    return Registered(envelope, first, again)


def test_identical_and_different_re_registrations_are_refused_and_not_stored(
    registered: Registered, attacker: Attacker
) -> None:
    # Prepare: the registration again, 300 times over the miners, and a different one
    miners, classes = attacker.miners, dataset_of(attacker.config).num_classes
    different = attacker.key(BYZANTINE).sign_record(Registration(BYZANTINE, (*([1] * classes), 0)))
    # Execute
    repeated = [attacker.submit(miners[i % len(miners)], registered.envelope) for i in range(300)]
    other = submit_everywhere(attacker, different)
    # Assert: ALREADY_EXISTS (finding 9), also for the copy sent while the first was
    # waiting to be ordered, never accepted=True; past a miner's per-signer rate
    # (bursts of 50, then 20 a second) RESOURCE_EXHAUSTED; one registration on every chain
    assert_refused([registered.again, *repeated[: len(miners) * 40]], Code.ALREADY_EXISTS)
    later = repeated[len(miners) * 40 :] + other
    codes = {o.code for o in later}
    assert codes <= {Code.ALREADY_EXISTS, Code.RESOURCE_EXHAUSTED}, later
    assert not any(leaks(o) for o in later)
    for miner in miners:
        mine = [r for r in registrations(attacker, miner) if r.client == BYZANTINE]
        assert mine == [Registration(BYZANTINE, cap_histogram(attacker.config))]


@dataclass
class RoundOne:
    selection: Selection
    honest: str  # the selected client that is not client-002
    unselected: str
    model: dict[str, torch.Tensor]
    digest: bytes


def registered_samples(attacker: Attacker, client: str) -> int:
    registration = next(
        r for r in registrations(attacker, attacker.miners[0]) if r.client == client
    )
    return max(1, sum(registration.histogram))


@pytest.fixture(scope="module")
def round_one(
    registered: Registered, network: LiveNetwork, attacker: Attacker, byzantine: ByzantineClient
) -> RoundOne:
    """Round 1 open on every miner, the honest selected client's update on every miner."""
    selection = wait_until(
        lambda: selection_of(attacker, 1), timeout=WAIT, what="round 1's selection"
    )
    assert BYZANTINE in selection.selected, selection  # the cap's claim tops Algorithm 1
    (honest,) = [c for c in selection.selected if c != BYZANTINE]
    (unselected,) = [c for c in attacker.clients if c not in selection.selected]
    sent = re.compile(
        rf"\[{honest} r1 v\d+ h\d+\] update sent to {len(attacker.miners)} of "
        rf"{len(attacker.miners)} miners"
    )
    wait_until(
        lambda: sent.search(network.log(process_of(honest))) is not None,
        timeout=WAIT,
        what=f"{honest}'s round-1 update on every miner",
    )
    model, digest = byzantine.model(1)
    assert digest == attacker.initial_digest
    return RoundOne(selection, honest, unselected, model, digest)


def send_everywhere(
    attacker: Attacker, parts: list[pb.TensorStreamPart], refused: set[bytes]
) -> list[Outcome]:
    refused.add(stream_digest(parts))
    return [attacker.submit_update(m, parts) for m in attacker.miners]


def assert_stored_nowhere(network: LiveNetwork, attacker: Attacker, refused: set[bytes]) -> None:
    held = {d.hex()[:12]: stored_at(network, attacker, d) for d in refused}
    assert all(not miners for miners in held.values()), held


def an_update(
    attacker: Attacker, r1: RoundOne, key: Key, *, seed: int, **fields: Any
) -> list[pb.TensorStreamPart]:
    """A well-formed round-1 update signed by ``key`` (``fields`` override the claim)."""
    claim: dict[str, Any] = {
        "round": 1,
        "base_digest": r1.digest,
        "num_samples": registered_samples(attacker, key.node_id)
        if key.node_id in attacker.clients
        else 1,
    }
    claim.update(fields)
    return update_parts(key, random_weights(attacker.spec, seed=seed), **claim)


def test_updates_with_forged_signatures_are_refused(
    round_one: RoundOne, network: LiveNetwork, attacker: Attacker, refused_digests: set[bytes]
) -> None:
    # Prepare: updates naming the honest selected client, not signed by it
    r1, honest = round_one, round_one.honest
    mallory = outsider("mallory")
    unknown = an_update(attacker, r1, mallory, seed=1, sender_id=honest)
    stolen_name = an_update(attacker, r1, mallory, seed=2, sender_id=honest)
    stolen_name[-1].trailer.claim.signer = attacker.key(honest).public_key
    as_model = an_update(attacker, r1, attacker.key(honest), seed=3, kind="model")
    other_claim = an_update(attacker, r1, attacker.key(honest), seed=4)
    other_claim[0].header.num_samples += 1  # the signed claim says otherwise
    # Execute / Assert: UNAUTHENTICATED (unknown signer, bad signature, wrong kind,
    # claim not matching the stream), nothing stored
    for parts in (unknown, stolen_name, as_model, other_claim):
        assert_refused(send_everywhere(attacker, parts, refused_digests), Code.UNAUTHENTICATED)
    assert_stored_nowhere(network, attacker, refused_digests)


def test_updates_signed_by_another_role_or_another_client_are_refused(
    round_one: RoundOne, network: LiveNetwork, attacker: Attacker, refused_digests: set[bytes]
) -> None:
    # Prepare
    r1 = round_one
    by_server = an_update(attacker, r1, attacker.key(attacker.server), seed=11)
    by_miner = an_update(attacker, r1, attacker.key(attacker.miners[1]), seed=12)
    honest_stream = an_update(attacker, r1, attacker.key(r1.honest), seed=13)
    signed_by_other = resigned(honest_stream, attacker.key(r1.unselected))
    # Execute / Assert: PERMISSION_DENIED (wrong role; signer is not the sender)
    for parts in (by_server, by_miner, signed_by_other):
        assert_refused(send_everywhere(attacker, parts, refused_digests), Code.PERMISSION_DENIED)
    assert_stored_nowhere(network, attacker, refused_digests)


def test_an_update_from_an_unselected_client_is_refused(
    round_one: RoundOne, network: LiveNetwork, attacker: Attacker, refused_digests: set[bytes]
) -> None:
    parts = an_update(attacker, round_one, attacker.key(round_one.unselected), seed=21)
    outcomes = send_everywhere(attacker, parts, refused_digests)
    assert_refused(outcomes, Code.PERMISSION_DENIED)
    assert all("not selected" in o.details for o in outcomes)
    assert_stored_nowhere(network, attacker, refused_digests)


@pytest.mark.parametrize("rnd", [0, 2, 2**63])
def test_an_update_for_another_round_is_refused(
    round_one: RoundOne,
    network: LiveNetwork,
    attacker: Attacker,
    refused_digests: set[bytes],
    rnd: int,
) -> None:
    parts = an_update(attacker, round_one, attacker.key(round_one.honest), seed=31, round=rnd)
    assert_refused(send_everywhere(attacker, parts, refused_digests), Code.FAILED_PRECONDITION)
    assert_stored_nowhere(network, attacker, refused_digests)


def test_a_second_different_update_of_a_client_is_refused(
    round_one: RoundOne, network: LiveNetwork, attacker: Attacker, refused_digests: set[bytes]
) -> None:
    # Prepare: the honest selected client already uploaded its update to every miner
    parts = an_update(attacker, round_one, attacker.key(round_one.honest), seed=41)
    # Execute / Assert
    assert_refused(send_everywhere(attacker, parts, refused_digests), Code.ALREADY_EXISTS)
    assert_stored_nowhere(network, attacker, refused_digests)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["NaN", "inf", "-inf"])
def test_an_update_with_non_finite_values_is_refused(
    round_one: RoundOne,
    network: LiveNetwork,
    attacker: Attacker,
    refused_digests: set[bytes],
    value: float,
) -> None:
    # Prepare: correctly signed by the honest selected client, one value not finite
    weights = random_weights(attacker.spec, seed=51)
    first = sorted(weights)[0]
    weights[first].view(-1)[7] = value
    parts = update_parts(
        attacker.key(round_one.honest),
        weights,
        round=1,
        base_digest=round_one.digest,
        num_samples=registered_samples(attacker, round_one.honest),
    )
    # Execute
    outcomes = send_everywhere(attacker, parts, refused_digests)
    # Assert
    assert_refused(outcomes, Code.INVALID_ARGUMENT)
    assert all("NaN or infinite" in o.details for o in outcomes), outcomes
    assert_stored_nowhere(network, attacker, refused_digests)


def test_an_update_from_another_model_or_claiming_other_samples_is_refused(
    round_one: RoundOne, network: LiveNetwork, attacker: Attacker, refused_digests: set[bytes]
) -> None:
    # Prepare: client-002 (selected, nothing sent yet), well signed
    key = attacker.key(BYZANTINE)
    other_base = an_update(attacker, round_one, key, seed=61, base_digest=b"\x00" * 32)
    billion = an_update(attacker, round_one, key, seed=62, num_samples=10**9)
    fewer = an_update(attacker, round_one, key, seed=63, num_samples=500)
    # Execute / Assert: INVALID_ARGUMENT, and client-002's place in round 1 stays free
    # (its own update is accepted later: round_two)
    for parts in (other_base, billion, fewer):
        assert_refused(send_everywhere(attacker, parts, refused_digests), Code.INVALID_ARGUMENT)
    assert_stored_nowhere(network, attacker, refused_digests)


def chunk(offset: int, data: bytes) -> pb.TensorStreamPart:
    return pb.TensorStreamPart(chunk=pb.TensorChunk(offset=offset, data=data))


Parts = list[pb.TensorStreamPart]
# Each defect: how to break a well-formed stream (header, one chunk, trailer), and the
# code the miners answer with (node.tensor_receiver's table).
MALFORMED: dict[str, tuple[Any, grpc.StatusCode]] = {
    "no part at all": (lambda p, limits: [], Code.INVALID_ARGUMENT),
    "an empty part": (lambda p, limits: [pb.TensorStreamPart()], Code.INVALID_ARGUMENT),
    "a chunk before the header": (lambda p, limits: [p[1], p[0], p[2]], Code.INVALID_ARGUMENT),
    "two headers": (lambda p, limits: [p[0], *p], Code.INVALID_ARGUMENT),
    "a part after the trailer": (lambda p, limits: [*p, p[1]], Code.INVALID_ARGUMENT),
    "no trailer": (lambda p, limits: p[:-1], Code.INVALID_ARGUMENT),
    "an empty chunk": (lambda p, limits: [p[0], chunk(0, b""), *p[1:]], Code.INVALID_ARGUMENT),
    "a gap between chunks": (
        lambda p, limits: [p[0], chunk(8, p[1].chunk.data), p[2]],
        Code.INVALID_ARGUMENT,
    ),
    "half the data": (
        lambda p, limits: [p[0], chunk(0, p[1].chunk.data[: len(p[1].chunk.data) // 2]), p[2]],
        Code.INVALID_ARGUMENT,
    ),
    "data past the declared size": (
        lambda p, limits: [p[0], chunk(0, p[1].chunk.data + b"\0" * 8), p[2]],
        Code.INVALID_ARGUMENT,
    ),
    "a chunk over the chunk limit": (
        lambda p, limits: [p[0], chunk(0, b"\0" * (limits[1] + 1)), p[2]],
        Code.RESOURCE_EXHAUSTED,
    ),
    "a size over the stream limit": (
        lambda p, limits: [with_header(p[0], total_bytes=limits[0] + 1), *p[1:]],
        Code.RESOURCE_EXHAUSTED,
    ),
    "a tensor missing": (
        lambda p, limits: [with_header(p[0], tensors=p[0].header.tensors[:-1]), *p[1:]],
        Code.INVALID_ARGUMENT,
    ),
    "a tensor twice": (
        lambda p, limits: [
            with_header(p[0], tensors=[*p[0].header.tensors, p[0].header.tensors[0]]),
            *p[1:],
        ],
        Code.INVALID_ARGUMENT,
    ),
    "a wrong shape": (
        lambda p, limits: [with_header(p[0], tensors=reshaped(p[0].header.tensors)), *p[1:]],
        Code.INVALID_ARGUMENT,
    ),
    "a wrong dtype": (
        lambda p, limits: [with_header(p[0], tensors=retyped(p[0].header.tensors)), *p[1:]],
        Code.INVALID_ARGUMENT,
    ),
    "a header without a sender": (  # signed by the client: names another sender
        lambda p, limits: [with_header(p[0], sender_id=""), *p[1:]],
        Code.PERMISSION_DENIED,
    ),
    "a trailer digest that is not the data's": (
        lambda p, limits: [*p[:-1], with_trailer_digest(p[-1], b"\x01" * 32)],
        Code.INVALID_ARGUMENT,
    ),
}


def with_header(part: pb.TensorStreamPart, **fields: Any) -> pb.TensorStreamPart:
    header = pb.TensorStreamHeader()
    header.CopyFrom(part.header)
    for name, value in fields.items():
        if name == "tensors":
            del header.tensors[:]
            header.tensors.extend(value)
        else:
            setattr(header, name, value)
    return pb.TensorStreamPart(header=header)


def reshaped(specs: Any) -> list[pb.TensorSpec]:
    first = pb.TensorSpec(name=specs[0].name, dtype=specs[0].dtype, shape=[*specs[0].shape, 1])
    return [first, *specs[1:]]


def retyped(specs: Any) -> list[pb.TensorSpec]:
    first = pb.TensorSpec(name=specs[0].name, dtype="float64", shape=specs[0].shape)
    return [first, *specs[1:]]


def with_trailer_digest(part: pb.TensorStreamPart, digest: bytes) -> pb.TensorStreamPart:
    trailer = pb.TensorStreamTrailer()
    trailer.CopyFrom(part.trailer)
    trailer.digest = digest
    return pb.TensorStreamPart(trailer=trailer)


@pytest.mark.parametrize("defect", list(MALFORMED))
def test_a_malformed_update_stream_is_refused(
    round_one: RoundOne,
    network: LiveNetwork,
    attacker: Attacker,
    refused_digests: set[bytes],
    defect: str,
) -> None:
    # Prepare: a stream of the honest selected client (one chunk: the model is small),
    # broken by someone who holds its key (a changed header is signed again)
    key = attacker.key(round_one.honest)
    good = an_update(attacker, round_one, key, seed=101)
    assert len(good) == 3
    protocol = attacker.genesis.protocol
    breaking, code = MALFORMED[defect]
    parts = breaking(good, (protocol.max_stream_bytes, protocol.chunk_bytes))
    if parts and parts[0].HasField("header") and parts[0].header != good[0].header:
        header = parts[0].header
        header.auth.CopyFrom(key.sign("update-header", signed_header(header)))
    refused_digests.add(stream_digest(good))
    # Execute
    outcomes = [attacker.submit_update(m, parts) for m in attacker.miners]
    # Assert
    assert_refused(outcomes, code)
    assert_stored_nowhere(network, attacker, refused_digests)


# Garbage, empty, truncated and oversized protobufs on every RPC --------------------------

OVERSIZED = b"\x0a" + b"\xff" * (5 << 20)  # above the nodes' 4 MiB message limit
# (node, service method, shape of the call, a well-formed request to cut short)
RPCS: dict[str, tuple[str, str, str, bytes]] = {
    "Node/Status": ("miner-1", method("Node", "Status"), "unary", b"\x0a\x05abcde"),
    "Miner/Submit": (
        "miner-1",
        method("Miner", "Submit"),
        "unary",
        pb.Envelope(kind="chain-register", payload=b"x" * 40).SerializeToString(),
    ),
    "Miner/SubmitUpdate": (
        "miner-1",
        method("Miner", "SubmitUpdate"),
        "client stream",
        pb.TensorStreamPart(header=pb.TensorStreamHeader(sender_id="x" * 40)).SerializeToString(),
    ),
    "Miner/FetchUpdate": (
        "miner-1",
        method("Miner", "FetchUpdate"),
        "server stream",
        pb.Envelope(
            kind="fetch-update",
            payload=pb.FetchUpdateRequest(digest=b"\x07" * 32).SerializeToString(),
        ).SerializeToString(),
    ),
    "Miner/FetchBlocks": (
        "miner-1",
        method("Miner", "FetchBlocks"),
        "server stream",
        pb.FetchBlocksRequest(from_height=2**40).SerializeToString(),
    ),
    "Miner/Deliver": (
        "miner-1",
        method("Miner", "Deliver"),
        "client stream",
        pb.PbftMessage(data=b"\x01" * 40).SerializeToString(),
    ),
    "Server/DownloadModel": (
        "server",
        method("Server", "DownloadModel"),
        "server stream",
        pb.Envelope(kind="model-request", payload=b"x" * 40).SerializeToString(),
    ),
    "Server/Attend": (
        "server",
        method("Server", "Attend"),
        "server stream",
        pb.AttendRequest(
            clients=[pb.Envelope(kind="attend", payload=b"x" * 40)]
        ).SerializeToString(),
    ),
    "Health/Check": (
        "miner-1",
        HEALTH_CHECK,
        "unary",
        health_pb2.HealthCheckRequest(service="x" * 40).SerializeToString(),
    ),
}
# What an empty request is: a valid default message for some RPCs.
EMPTY_ANSWERS = {
    "Node/Status": Code.OK,
    "Miner/Submit": Code.INVALID_ARGUMENT,  # no such record kind
    "Miner/SubmitUpdate": Code.INVALID_ARGUMENT,  # a stream must start with a header
    "Miner/FetchUpdate": Code.UNAUTHENTICATED,  # no fetch-update signature
    "Miner/FetchBlocks": Code.OK,
    "Miner/Deliver": Code.UNAUTHENTICATED,  # no link signature
    "Server/DownloadModel": Code.UNAUTHENTICATED,  # not a model request
    "Server/Attend": Code.INVALID_ARGUMENT,  # names no client
    "Health/Check": Code.OK,
}


def fuzz_request(rpc: str, payload: str) -> bytes:
    well_formed = RPCS[rpc][3]
    return {
        "garbage": b"\xff" * 16,
        "empty": b"",
        "truncated": well_formed[: len(well_formed) // 2],
        "oversized": OVERSIZED,
    }[payload]


def fuzz_answer(rpc: str, payload: str) -> grpc.StatusCode:
    return {
        "garbage": Code.INVALID_ARGUMENT,
        "empty": EMPTY_ANSWERS[rpc],
        "truncated": Code.INVALID_ARGUMENT,
        "oversized": Code.RESOURCE_EXHAUSTED,
    }[payload]


def log_after(path: Path, offset: int) -> str:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


@pytest.mark.parametrize("payload", ["garbage", "empty", "truncated", "oversized"])
@pytest.mark.parametrize("rpc", list(RPCS))
def test_a_malformed_protobuf_gets_a_clean_status_and_logs_no_traceback(
    round_one: RoundOne, network: LiveNetwork, attacker: Attacker, rpc: str, payload: str
) -> None:
    # Prepare
    node, path, shape, _ = RPCS[rpc]
    request = fuzz_request(rpc, payload)
    log = node_log(network, node)
    offset = log.stat().st_size
    heights = [len(attacker.blocks(m) or []) for m in attacker.miners]
    # Execute
    if shape == "unary":
        outcome = attacker.unary(node, path, request)
    elif shape == "client stream":
        outcome = attacker.client_stream(node, path, [request])
    else:
        outcome = attacker.server_stream(node, path, request)
    # Assert: the expected code, details that tell nothing internal, no traceback in
    # the node's log (written before the status leaves), nothing new on any chain
    # (round 1 is held open: the chains do not move meanwhile)
    assert (outcome.code, leaks(outcome)) == (fuzz_answer(rpc, payload), False), outcome.details
    assert "Traceback" not in log_after(log, offset)
    assert [len(attacker.blocks(m) or []) for m in attacker.miners] == heights


PBFT_BYTES = {
    "an unknown message kind": b"\xee" + b"\x00" * 8,
    "a body cut short": b"\x02\x00\x00\x01\x00abc",
    "bytes after the signature": b"\x02\x00\x00\x00\x00\x00\x00\x00\x00extra",
}


@pytest.mark.parametrize("defect", list(PBFT_BYTES))
def test_pbft_bytes_of_a_byzantine_miner_that_do_not_decode_are_refused(
    round_one: RoundOne, attacker: Attacker, defect: str
) -> None:
    # Prepare: a Deliver stream carrying one message that is not consensus.messages
    # bytes, with miner-3's link signature (a Byzantine miner)
    key = attacker.key(attacker.miners[3])
    # Execute
    outcomes = [attacker.deliver(m, [PBFT_BYTES[defect]], key) for m in attacker.miners[:3]]
    # Assert
    assert_refused(outcomes, Code.INVALID_ARGUMENT)
    assert all(o.details.startswith("malformed message") for o in outcomes), outcomes


def forged_pre_prepare(attacker: Attacker, *, megabytes: float) -> bytes:
    """A well-formed PRE-PREPARE for the next height, its block ``megabytes`` large,
    signed (inside) by a key no genesis lists, as replica 0."""
    height = len(attacker.blocks(attacker.miners[0]) or []) + 1
    size = 64 * 1024
    filler = [
        Request("client-000", i, bytes([i % 251]) * size, b"\0" * 64)
        for i in range(int(megabytes * (1 << 20)) // size)
    ]
    payload = encode_batch(filler)
    header = BlockHeader(
        height=height,
        previous_hash=GENESIS_HASH,
        view=0,
        proposer=0,
        payload_digest=hashlib.sha256(payload).digest(),
    )
    message = PrePrepare(view=0, height=height, block=Block(header, payload), sender=0)
    message.signature = outsider("forger").signing.sign(message.signed).signature
    return message.encode()


@pytest.mark.parametrize("signer", ["none", "outsider", "client"])
def test_a_flood_of_pre_prepares_no_miner_signed_is_refused_unread(
    round_one: RoundOne, network: LiveNetwork, attacker: Attacker, signer: str
) -> None:
    # Prepare: 15 PRE-PREPAREs of 3.5 MiB for each miner, with no link signature,
    # an outsider's, or a client's (finding 3)
    data = forged_pre_prepare(attacker, megabytes=3.5)
    key = {"none": None, "outsider": outsider("miner-9"), "client": attacker.key(round_one.honest)}
    heights = [len(attacker.blocks(m) or []) for m in attacker.miners]
    # Execute
    outcomes = [
        attacker.deliver(m, [data], key[signer]) for m in attacker.miners for _ in range(15)
    ]
    # Assert: refused for the link signature, before decoding; the chains have not moved
    code = Code.PERMISSION_DENIED if signer == "client" else Code.UNAUTHENTICATED
    assert_refused(outcomes, code)
    assert not any("malformed" in o.details for o in outcomes)
    assert [len(attacker.blocks(m) or []) for m in attacker.miners] == heights


def test_a_flood_of_unsigned_streams_with_huge_names_costs_the_log_almost_nothing(
    round_one: RoundOne, network: LiveNetwork, attacker: Attacker
) -> None:
    # Prepare: 200 unsigned update headers, each naming a 100 kB tensor (finding 5:
    # 73 MiB of log in 2.6 s, the names echoed in full)
    log = node_log(network, attacker.miners[1])
    offset = log.stat().st_size
    name = "w" * 100_000 + "\n[miner-1 r1] forged line"
    header = pb.TensorStreamHeader(
        round=1, sender_id=round_one.honest, tensors=[pb.TensorSpec(name=name, dtype="float32")]
    )
    parts = [pb.TensorStreamPart(header=header)]
    # Execute
    outcomes = [attacker.submit_update(attacker.miners[1], parts) for _ in range(200)]
    # Assert: refused unread; the log grew by a few lines at most, no name in it
    assert_refused(outcomes, Code.UNAUTHENTICATED)
    grown = log_after(log, offset)
    assert len(grown) < 5_000, len(grown)
    assert "www" not in grown and "forged line" not in grown


def test_idle_update_streams_are_ended_by_the_miner(
    round_one: RoundOne, attacker: Attacker
) -> None:
    # Prepare / Execute: 50 SubmitUpdate streams that never send a message (finding 6)
    with attacker.idle_update_streams(attacker.miners[0], 50) as streams:
        ended = [wait_for_code(f, STREAM_IDLE_SECONDS + 20) for f in streams]
    # Assert: the miner ended each one itself, for idleness
    assert set(ended) == {Code.DEADLINE_EXCEEDED}, ended


def wait_for_code(future: grpc.Future, timeout: float) -> grpc.StatusCode:
    """The status a stream call ended with (the test fails after ``timeout`` s)."""
    try:
        future.result(timeout=timeout)
    except grpc.FutureTimeoutError:
        pytest.fail(f"a stream was still open after {timeout:.0f} s")
    except grpc.RpcError as exc:
        return exc.code()
    return Code.OK


# Model downloads, start-round notices, records out of turn, health -------------------------


def test_the_model_goes_to_no_one_but_a_selected_client_asking_for_itself(
    round_one: RoundOne, attacker: Attacker
) -> None:
    # Prepare
    r1, honest = round_one, attacker.key(round_one.honest)
    unselected = attacker.key(round_one.unselected)
    requests = {
        Code.PERMISSION_DENIED: [
            attacker.model_request(unselected, round=1),  # not selected
            attacker.model_request(honest, round=1, client_id=r1.unselected),  # another's name
            attacker.model_request(attacker.key(attacker.miners[2]), round=1),  # a miner
        ],
        Code.FAILED_PRECONDITION: [attacker.model_request(honest, round=2)],  # not open
        Code.UNAUTHENTICATED: [
            attacker.model_request(outsider("mallory"), round=1, client_id=r1.honest),
            honest.sign("start-round", pb.ModelRequest(round=1).SerializeToString()),
        ],
        Code.INVALID_ARGUMENT: [honest.sign("model-request", b"\xff" * 12)],
    }
    # Execute / Assert
    for code, envelopes in requests.items():
        assert_refused([attacker.download_model(e) for e in envelopes], code)


def test_attendances_not_signed_fresh_by_each_client_are_refused(
    round_one: RoundOne, attacker: Attacker
) -> None:
    # Prepare: clients dial out, so the only way to reach one with a notice is
    # the server's Attend stream; an attacker tries to take a client's place on it
    r1 = round_one
    byzantine = attacker.key(BYZANTINE)
    stale = int(time.time() * 1000) - 10 * 60_000
    attempts = {
        Code.PERMISSION_DENIED: [
            [attacker.attendance(byzantine, client_id=r1.honest)],  # another client's place
            [attacker.attendance(attacker.key(attacker.miners[0]))],  # not a client
        ],
        Code.UNAUTHENTICATED: [[attacker.attendance(outsider("mallory"), client_id=r1.honest)]],
        Code.INVALID_ARGUMENT: [
            [],
            [attacker.attendance(byzantine, time_ms=stale)],  # a replayed, old attendance
            [attacker.attendance(byzantine, network=b"\x07" * 32)],  # another network's
            [byzantine.sign("attend", b"\xff" * 12)],
        ],
    }
    # Execute / Assert
    for code, requests in attempts.items():
        assert_refused([attacker.attend(entries) for entries in requests], code)


def test_records_from_the_wrong_role_or_out_of_turn_are_refused(
    round_one: RoundOne, attacker: Attacker
) -> None:
    # Prepare: a selection and a summary the chain does not expect now, signed by the
    # server's real key, and records signed by whom may not submit them
    r1, server = round_one, attacker.key(attacker.server)
    miner = attacker.key(attacker.miners[0])
    select_2 = Selection(2, b"\x00" * 32, r1.selection.selected, ())
    other_select_1 = Selection(1, r1.selection.seed, (r1.unselected, BYZANTINE), ())
    summary_1 = RoundSummary(1, b"\x00" * 32, 0.99, 0.01)
    verdicts = RoundVerdicts(1, (), r1.selection.selected, (), ())
    envelopes = {
        Code.INVALID_ARGUMENT: [
            miner.sign_record(verdicts),  # miners' records are not submitted
            server.sign("chain-nonsense", encode_operation(summary_1)),
            server.sign("chain-select", encode_operation(summary_1)),  # kinds differ
            server.sign("chain-select", b"\xff" * 20),
        ],
        Code.PERMISSION_DENIED: [
            attacker.key(r1.honest).sign_record(select_2),
            miner.sign_record(summary_1),
        ],
        Code.UNAUTHENTICATED: [
            outsider("mallory").sign_record(select_2),
            pb.Envelope(
                kind=record_kind_name(select_2),
                payload=encode_operation(select_2),
                signer=server.public_key,
                signature=b"\x00" * 64,
            ),
        ],
        Code.FAILED_PRECONDITION: [server.sign_record(select_2), server.sign_record(summary_1)],
        Code.ALREADY_EXISTS: [server.sign_record(other_select_1)],  # round 1's timestamp
    }
    # Execute / Assert
    for code, sent in envelopes.items():
        for envelope in sent:
            assert_refused(submit_everywhere(attacker, envelope), code)


@pytest.mark.parametrize("node", ["miner-2", "server"])  # clients listen on nothing
def test_an_empty_health_check_is_answered_serving_without_a_traceback(
    round_one: RoundOne, network: LiveNetwork, attacker: Attacker, node: str
) -> None:
    # Prepare
    log = node_log(network, node)
    offset = log.stat().st_size
    # Execute
    outcome = attacker.health_check(node, b"")
    # Assert
    assert outcome.ok, outcome
    assert outcome.reply.status == health_pb2.HealthCheckResponse.SERVING
    assert "Traceback" not in log_after(log, offset)


# Round 2: client-002's round-1 update is in ---------------------------------------------


@dataclass
class RoundTwo:
    parts: list[pb.TensorStreamPart]  # client-002's round-1 update
    verdicts: RoundVerdicts  # of round 1
    selection: Selection  # of round 2


@pytest.fixture(scope="module")
def round_two(round_one: RoundOne, attacker: Attacker, byzantine: ByzantineClient) -> RoundTwo:
    parts = byzantine.update(1, round_one.model, round_one.digest)
    receipts = attacker.submit_update_everywhere(parts)
    assert all(r.ok for r in receipts), receipts
    verdicts = wait_until(lambda: verdicts_of(attacker, 1), timeout=WAIT, what="round 1's verdicts")
    selection = wait_until(
        lambda: selection_of(attacker, 2), timeout=WAIT, what="round 2's selection"
    )
    return RoundTwo(parts, verdicts, selection)


def test_updates_replayed_after_their_round_are_refused(
    round_two: RoundTwo, network: LiveNetwork, attacker: Attacker
) -> None:
    # Prepare: round 1's updates as a miner serves them, with their clients' claims
    streams = []
    reader = attacker.key(attacker.server)
    for u in round_two.verdicts.updates:
        fetched = attacker.fetch_update(attacker.miners[0], u.digest, u.client, reader)
        assert fetched.ok, fetched
        streams.append(fetched.reply)
    # Execute
    outcomes = [attacker.submit_update(m, s) for s in streams for m in attacker.miners]
    # Assert: round 1 is closed; the stores hold each update once, as before
    assert_refused(outcomes, Code.FAILED_PRECONDITION)
    for u in round_two.verdicts.updates:
        for miner in attacker.miners:
            held = list((network.run_dir / miner / "blobs").glob(f"{u.digest.hex()}*"))
            assert [p.name for p in held] == [f"{u.digest.hex()}-{u.client}.bin"]


@pytest.mark.parametrize("reader", ["a client", "an outsider", "a stale request"])
def test_only_miners_and_the_server_read_updates(
    round_two: RoundTwo, attacker: Attacker, reader: str
) -> None:
    # Prepare: a request for another client's round-1 update (finding 8: anyone could
    # download any update), signed by a client, by a key no genesis lists, or by the
    # server two minutes ago
    u = round_two.verdicts.updates[0]
    key = {
        "a client": attacker.key(BYZANTINE),
        "an outsider": outsider("reader"),
        "a stale request": attacker.key(attacker.server),
    }[reader]
    issued = int(time.time() * 1000) - 120_000 if reader == "a stale request" else None
    # Execute
    outcomes = [
        attacker.fetch_update(m, u.digest, u.client, key, issued_ms=issued) for m in attacker.miners
    ]
    # Assert
    code = {
        "a client": Code.PERMISSION_DENIED,
        "an outsider": Code.UNAUTHENTICATED,
        "a stale request": Code.PERMISSION_DENIED,
    }[reader]
    assert_refused(outcomes, code)


def envelope_of(attacker: Attacker, entry: ChainEntry) -> pb.Envelope:
    """The envelope its submitter sent, rebuilt from a request on the chain."""
    assert entry.record is not None
    return pb.Envelope(
        kind=record_kind_name(entry.record),
        payload=entry.request.operation,
        signer=attacker.genesis.membership[entry.request.client].public_key,
        signature=entry.request.signature,
    )


def test_records_replayed_from_the_chain_are_refused(
    round_two: RoundTwo, attacker: Attacker
) -> None:
    # Prepare: every record on the chain so far, as its submitter signed it
    entries = attacker.chain(attacker.miners[0])
    replayed = [e for e in entries if not isinstance(e.record, RoundVerdicts)]
    by_miners = [e for e in entries if isinstance(e.record, RoundVerdicts)]
    assert {type(e.record) for e in replayed} == {Registration, Selection, RoundSummary}
    # Execute
    outcomes = [o for e in replayed for o in submit_everywhere(attacker, envelope_of(attacker, e))]
    miners_own = [
        o for e in by_miners for o in submit_everywhere(attacker, envelope_of(attacker, e))
    ]
    # Assert: a used timestamp is ALREADY_EXISTS, never accepted=True (finding 9); a
    # miner's record is not for Submit at all
    assert_refused(outcomes, Code.ALREADY_EXISTS)
    assert_refused(miners_own, Code.INVALID_ARGUMENT)


def test_a_model_request_of_a_closed_round_is_refused(
    round_two: RoundTwo, round_one: RoundOne, attacker: Attacker
) -> None:
    request = attacker.model_request(attacker.key(round_one.honest), round=1)
    assert_refused([attacker.download_model(request)], Code.FAILED_PRECONDITION)


def flat(weights: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([weights[n].double().reshape(-1) for n in sorted(weights)])


def test_an_inflated_claim_weighs_at_most_twice_the_rounds_median(
    round_two: RoundTwo, round_one: RoundOne, attacker: Attacker, byzantine: ByzantineClient
) -> None:
    # Prepare: round 1's updates (client-002 claimed the record cap) as the miners
    # hold them; every one accepted, so each is in the aggregate
    verdicts = round_two.verdicts
    assert all(u.accepted for u in verdicts.updates), verdicts
    counts = {u.client: u.n_samples for u in verdicts.updates}
    assert counts[BYZANTINE] == record_cap(attacker.config) > 2 * counts[round_one.honest]
    deltas = {}
    for u in verdicts.updates:
        reader = attacker.key(attacker.server)
        fetched = attacker.fetch_update(attacker.miners[0], u.digest, u.client, reader)
        assert fetched.ok, fetched
        deltas[u.client] = flat(tensors_of(fetched.reply))

    def fedavg(weights: dict[str, float]) -> torch.Tensor:
        total = sum(weights.values())
        step = sum(weights[c] / total * deltas[c] for c in deltas)
        return flat(round_one.model) + step

    bound = 2 * statistics.median_low(counts.values())
    clipped = fedavg({c: min(n, bound) for c, n in counts.items()})
    as_claimed = fedavg({c: float(n) for c, n in counts.items()})
    # Execute: the round-2 model, as the server hands it to a selected client
    model, digest = byzantine.model(2)
    got = flat(model)
    # Assert: client-002 weighs twice the median count, not its claim (finding 2);
    # the model is the one the chain's round-1 summary commits to
    summaries = records_of(attacker, attacker.miners[0], RoundSummary)
    assert [s.model_digest for s in summaries if s.round == 1] == [digest]
    assert float((got - clipped).abs().max()) < 1e-5
    assert float((got - as_claimed).abs().max()) > 1e-3


# The end of the run --------------------------------------------------------------------


def chain_audit(entries: list[ChainEntry], clients: list[str]) -> list[str]:
    """What a chain holds that no attack may have put there."""
    problems = []
    keys = [(e.request.client, e.request.timestamp) for e in entries]
    if len(keys) != len(set(keys)):
        problems.append("a (submitter, timestamp) is on the chain twice")
    registered = sorted(e.record.client for e in entries if isinstance(e.record, Registration))
    if registered != sorted(clients):
        problems.append(f"registrations {registered}")
    if any(e.record is None for e in entries):
        problems.append("an undecodable record")
    return problems


def test_the_attacked_run_finishes_with_one_head_and_every_chain_verified(
    round_two: RoundTwo,
    network: LiveNetwork,
    attacker: Attacker,
    byzantine: ByzantineClient,
    refused_digests: set[bytes],
) -> None:
    # Prepare: client-002 takes part in the rounds left whenever it is selected; its
    # own process is thawed once the last round is summarised
    rounds = attacker.config.rounds
    for rnd in range(2, rounds + 1):
        selection = wait_until(
            lambda rnd=rnd: selection_of(attacker, rnd), timeout=WAIT, what=f"round {rnd}"
        )
        if BYZANTINE in selection.selected:
            model, digest = byzantine.model(rnd)
            parts = byzantine.update(rnd, model, digest)
            receipts = attacker.submit_update_everywhere(parts)
            assert all(r.ok for r in receipts), receipts
    wait_until(
        lambda: any(s.round == rounds for s in records_of(attacker, "miner-0", RoundSummary)),
        timeout=WAIT,
        what="the last round's summary",
    )
    network.thaw(BYZANTINE_PROCESS)
    # Execute
    output = network.finish(timeout=240)
    # Assert: every round done, one head on every miner, `chain verify` passes on each
    metrics = network.metrics()
    assert [r["round"] for r in metrics["rounds"]] == list(range(1, rounds + 1))
    heads = metrics["chain_heads"]
    assert sorted(heads) == attacker.miners and len(set(heads.values())) == 1, heads
    assert "one head; `chain verify` OK on every one" in output
    for miner, result in network.verify_chains(attacker.miners).items():
        assert result.returncode == 0 and "chain OK" in result.stdout, (miner, result.stdout)
    # Assert: each chain holds one registration per client (client-002's the record
    # cap), no timestamp twice, no update an attack sent; no blob store holds one
    chains = {
        m: chain_entries(read_blocks(network.run_dir / m / "chain.db")) for m in attacker.miners
    }
    for miner, entries in chains.items():
        assert chain_audit(entries, attacker.clients) == [], miner
        on_chain = {
            u.digest
            for e in entries
            if isinstance(e.record, RoundVerdicts)
            for u in e.record.updates
        }
        assert not on_chain & refused_digests, miner
        mine = [e.record for e in entries if isinstance(e.record, Registration)]
        assert Registration(BYZANTINE, cap_histogram(attacker.config)) in mine
    assert_stored_nowhere(network, attacker, refused_digests)
    digests = {m: [b.digest for b in read_blocks(network.run_dir / m / "chain.db")] for m in heads}
    assert all(d == digests["miner-0"] for d in digests.values())


def test_no_refusal_told_internal_text_and_no_node_logged_a_traceback(
    round_two: RoundTwo, network: LiveNetwork, attacker: Attacker
) -> None:
    # Prepare: every call the attacks made, and every node's log
    names = [*attacker.miners, attacker.server, *(process_of(c) for c in attacker.clients)]
    logged = {n: network.log(n) for n in names}
    # Assert: no refusal told the caller more than a domain error's one line
    # (INTERNAL only as "internal error"), no node logged a traceback
    assert attacker.outcomes, "run the attack tests of this module first"
    told = sorted({(o.code.name, o.details[:120]) for o in attacker.outcomes if leaks(o)})
    assert told == []
    internal = [o.details for o in attacker.outcomes if o.code == Code.INTERNAL]
    assert all(d == "internal error" for d in internal), internal
    errors = {
        n: sorted({line[:160] for line in text.splitlines() if "ERROR" in line})
        for n, text in logged.items()
        if "Traceback" in text
    }
    assert errors == {}
