"""Off-chain data: update blobs stored by digest, and the global model of each round.

:class:`BlobStore` keeps each accepted-for-storage update as the exact
tensor stream the client sent (header, chunks, the client's signed trailer),
one file per digest under ``DIR/blobs/``; reading a blob back runs the full
receiver checks again, so a corrupted file is never used.

:class:`GlobalModels` recomputes the global model of every round from the
chain: round 1 starts from the seeded initial model, and round r+1 from
``fl.rounds.aggregate_round`` over the updates the committed verdicts of
round r accepted, exactly as the simulator and the server do. Miners use it
to validate updates (and to check the server's round summary); the server
uses it to aggregate, and a restarted server can :meth:`GlobalModels.resume`
it from a checkpoint (``node.checkpoints``) so that it aggregates only the
rounds after it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

import torch

from chain.records import ChainState
from consensus.canonical import Reader, pack_blob
from fl.config import RunConfig
from fl.models import build_model
from fl.rounds import ClientUpdate, aggregate_round
from fl.seeds import torch_generator
from fl.weights import get_weights
from node.durable import write_durably
from node.membership import Membership
from node.tensor_receiver import ReceivedTensors, receive_tensor_stream
from node.tensors import UPDATE_KIND, ModelSpec, model_spec, relay_stream
from proto import llbcfl_pb2 as pb


def initial_weights(config: RunConfig) -> OrderedDict[str, torch.Tensor]:
    """The round-1 global model: the seeded initial model the simulator builds."""
    return get_weights(build_model(config.model, generator=torch_generator(config.seed, "init")))


def initial_spec(config: RunConfig) -> ModelSpec:
    return model_spec(initial_weights(config))


class BlobStore:
    """Update streams by digest (files), with an in-memory cache of decoded ones."""

    def __init__(
        self, directory: Path | None, *, membership: Membership, spec: ModelSpec, max_bytes: int
    ) -> None:
        self._dir = Path(directory) / "blobs" if directory is not None else None
        if self._dir is not None:
            self._dir.mkdir(parents=True, exist_ok=True)
        self._membership = membership
        self._spec = spec
        self._max_bytes = max_bytes
        # Keyed by (digest, client): two clients may send identical tensors.
        self._cache: dict[tuple[bytes, str], ReceivedTensors] = {}
        self._digests: dict[bytes, tuple[bytes, str]] = {}
        self.by_round: dict[int, dict[str, bytes]] = {}  # round -> client -> digest
        if self._dir is not None:
            for path in sorted(self._dir.glob("*.bin")):
                try:
                    self._remember(self._read(path))
                except Exception:  # a torn or corrupted file: drop it
                    path.unlink(missing_ok=True)

    def _path(self, digest: bytes, client: str) -> Path:
        assert self._dir is not None
        return self._dir / f"{digest.hex()}-{client}.bin"

    def _remember(self, received: ReceivedTensors) -> None:
        key = (received.digest, received.sender.node_id)
        self._cache[key] = received
        self._digests.setdefault(received.digest, key)
        self.by_round.setdefault(received.round, {})[received.sender.node_id] = received.digest

    def _read(self, path: Path) -> ReceivedTensors:
        reader = Reader(path.read_bytes())
        parts = []
        for _ in range(reader.count()):
            part = pb.TensorStreamPart()
            part.ParseFromString(reader.blob())
            parts.append(part)
        reader.finish()
        return receive_tensor_stream(
            parts,
            expected=self._spec,
            membership=self._membership,
            kind=UPDATE_KIND,
            max_total_bytes=self._max_bytes,
        )

    def has(self, digest: bytes) -> bool:
        return digest in self._digests

    def get(self, digest: bytes, client: str | None = None) -> ReceivedTensors | None:
        """The stream with ``digest`` sent by ``client`` (any sender when None)."""
        if client is not None:
            return self._cache.get((digest, client))
        key = self._digests.get(digest)
        return None if key is None else self._cache[key]

    def put(self, received: ReceivedTensors) -> None:
        """Store durably (``node.durable``) before anyone is told it is stored."""
        if (received.digest, received.sender.node_id) in self._cache:
            return
        if self._dir is not None:
            parts = [p.SerializeToString() for p in relay_stream(received)]
            data = len(parts).to_bytes(4, "big") + b"".join(pack_blob(p) for p in parts)
            write_durably(self._path(received.digest, received.sender.node_id), data)
        self._remember(received)

    def missing(self, digests: Iterable[bytes]) -> list[bytes]:
        return [d for d in digests if d not in self._digests]


def as_update(received: ReceivedTensors, *, client: str, n_samples: int) -> ClientUpdate:
    """``received``'s tensors as ``client``'s update (the chain names client and weight)."""
    return ClientUpdate(client, received.round, OrderedDict(received.weights), n_samples, 0.0)


class GlobalModels:
    """Global weights at the start of each round, recomputed from the chain and the blobs."""

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self._weights: dict[int, OrderedDict[str, torch.Tensor]] = {1: initial_weights(config)}
        self._velocity: dict[int, torch.Tensor | None] = {1: None}
        self._digests: dict[int, bytes] = {}

    def resume(
        self, rnd: int, weights: OrderedDict[str, torch.Tensor], velocity: torch.Tensor | None
    ) -> None:
        """Start over from ``weights`` and ``velocity`` at the start of round ``rnd``.

        The caller vouches for them (a checkpoint of round ``rnd - 1`` whose
        digest the chain holds); rounds before ``rnd`` are no longer available.
        """
        self._weights = {rnd: OrderedDict(weights)}
        self._velocity = {rnd: velocity}
        self._digests = {}

    @property
    def first(self) -> int:
        """The earliest round whose weights this can give (1 unless resumed)."""
        return min(self._weights)

    def known(self, rnd: int) -> bool:
        return rnd in self._weights

    def velocity(self, rnd: int) -> torch.Tensor | None:
        """The server velocity at the start of round ``rnd`` (computed by :meth:`weights`)."""
        return self._velocity[rnd]

    def weights(self, rnd: int, state: ChainState, blobs: BlobStore) -> OrderedDict | None:
        """Weights for round ``rnd`` (None while a needed blob or verdict is missing)."""
        if rnd < self.first:
            raise ValueError(f"round {rnd} is before round {self.first}, where this resumed")
        top = max(self._weights)
        while top < rnd:
            verdicts = state.verdicts.get(top)
            if verdicts is None:
                return None
            accepted = [u for u in verdicts.updates if u.accepted]
            received = [blobs.get(u.digest) for u in accepted]
            if any(r is None for r in received):
                return None
            updates = [
                as_update(r, client=u.client, n_samples=u.n_samples)
                for u, r in zip(accepted, received, strict=True)
                if r is not None
            ]
            weights, velocity = aggregate_round(
                self.config, self._weights[top], updates, rnd=top, velocity=self._velocity[top]
            )
            self._weights[top + 1] = weights
            self._velocity[top + 1] = velocity
            top += 1
        return self._weights[rnd]

    def digest(self, rnd: int, state: ChainState, blobs: BlobStore) -> bytes | None:
        from node.tensors import weights_digest

        if rnd not in self._digests:
            weights = self.weights(rnd, state, blobs)
            if weights is None:
                return None
            self._digests[rnd] = weights_digest(weights)
        return self._digests[rnd]
