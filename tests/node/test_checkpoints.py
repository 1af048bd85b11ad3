"""Server checkpoints: resuming from them equals recomputing, and only the chain's are used.

A small history (three rounds of signed updates from three clients, server
momentum 0.5 so the FedAvgM velocity matters) is aggregated from scratch
with ``GlobalModels``; checkpoints written from it are read back and checked
against round summaries holding the recomputed digests.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from chain.digests import ModelSpec
from chain.digests import weights_digest as digest_of
from chain.models import GlobalModels, initial_spec, initial_weights
from chain.records import RoundSummary, RoundVerdicts, UpdateRecord
from chain.state import ChainState
from fl.config import RunConfig
from fl.data import Split
from node.checkpoints import (
    Checkpoint,
    checkpoint_path,
    newest_trusted_checkpoint,
    read_checkpoint,
    write_checkpoint,
)
from node.daemon import NodeLog
from node.genesis import Genesis
from node.identity import Identity
from node.offchain import BlobStore
from node.server import Server
from node.tensor_receiver import receive_tensor_stream
from node.tensors import UPDATE_KIND, tensor_stream

CONFIG = RunConfig(clients=3, rounds=3, model="mlp", server_momentum=0.5, server_lr=0.5)
CLIENTS = ("client-000", "client-001", "client-002")
ROUNDS = 3


@dataclass
class History:
    state: ChainState
    blobs: BlobStore
    models: GlobalModels  # recomputed from round 1
    spec: ModelSpec

    def checkpoint(self, rnd: int) -> Checkpoint:
        weights = self.models.weights(rnd + 1, self.state, self.blobs.update_of)
        assert weights is not None
        return Checkpoint(rnd, weights, self.models.velocity(rnd + 1))

    def summaries(self, last: int = ROUNDS) -> dict[int, RoundSummary]:
        return {
            r: RoundSummary(r, digest_of(self.checkpoint(r).weights), 0.5, 0.5)
            for r in range(1, last + 1)
        }


def random_delta(generator: torch.Generator) -> OrderedDict[str, torch.Tensor]:
    return OrderedDict(
        (name, 0.01 * torch.randn(t.shape, generator=generator))
        for name, t in initial_weights(CONFIG).items()
    )


@pytest.fixture(scope="module")
def history(genesis: Genesis, identities: dict[str, Identity]) -> History:
    """Rounds 1-3: every client's signed update accepted, then the models from scratch."""
    spec = initial_spec(CONFIG)
    limit = genesis.protocol.max_stream_bytes
    blobs = BlobStore(None, membership=genesis.membership, spec=spec, max_bytes=limit)
    state = ChainState(CONFIG, clients=CLIENTS)
    generator = torch.Generator().manual_seed(7)
    for rnd in range(1, ROUNDS + 1):
        entries = []
        for n, cid in enumerate(CLIENTS, start=1):
            parts = tensor_stream(
                random_delta(generator),
                identity=identities[cid],
                kind=UPDATE_KIND,
                round=rnd,
                num_samples=100 * n,
            )
            received = receive_tensor_stream(
                parts,
                expected=spec,
                membership=genesis.membership,
                kind=UPDATE_KIND,
                max_total_bytes=limit,
            )
            blobs.put(received)
            entries.append(UpdateRecord(cid, received.digest, b"", 100 * n, 0.9, True, "", b"sig"))
        state.verdicts[rnd] = RoundVerdicts(rnd, tuple(entries), (), (), ())
    models = GlobalModels(CONFIG)
    assert models.weights(ROUNDS + 1, state, blobs.update_of) is not None
    return History(state, blobs, models, spec)


def resumed_weights(history: History, checkpoint: Checkpoint) -> OrderedDict[str, torch.Tensor]:
    models = GlobalModels(CONFIG)
    models.resume(checkpoint.round + 1, checkpoint.weights, checkpoint.velocity)
    weights = models.weights(ROUNDS + 1, history.state, history.blobs.update_of)
    assert weights is not None
    return weights


def newest(
    history: History, directory: Path, *, summaries: dict[int, RoundSummary] | None = None
) -> tuple[int | None, list[str]]:
    """The round of the newest trusted checkpoint, and the warnings about newer ones."""
    warnings: list[str] = []
    found = newest_trusted_checkpoint(
        directory,
        summaries=history.summaries() if summaries is None else summaries,
        spec=history.spec,
        with_velocity=True,
        warn=warnings.append,
    )
    return (None if found is None else found.round), warnings


def test_models_resumed_from_a_checkpoint_equal_the_recomputation(
    history: History, tmp_path: Path
) -> None:
    # Prepare: the checkpoint of round 1, written and read back
    path = write_checkpoint(tmp_path, history.checkpoint(1))
    checkpoint = read_checkpoint(path, spec=history.spec, with_velocity=True)
    # Execute: aggregate rounds 2 and 3 from it
    weights = resumed_weights(history, checkpoint)
    # Assert: bit for bit the weights recomputed from round 1
    expected = history.models.weights(ROUNDS + 1, history.state, history.blobs.update_of)
    assert expected is not None
    assert list(weights) == list(expected)
    assert all(torch.equal(weights[name], expected[name]) for name in expected)


def test_checkpoint_weights_come_back_in_the_model_order(history: History, tmp_path: Path) -> None:
    # Prepare: saved in reverse order (the aggregation flattens in the model's order)
    good = history.checkpoint(1)
    reversed_weights = OrderedDict(reversed(list(good.weights.items())))
    path = write_checkpoint(tmp_path, Checkpoint(1, reversed_weights, good.velocity))
    # Execute
    checkpoint = read_checkpoint(path, spec=history.spec, with_velocity=True)
    # Assert
    assert list(checkpoint.weights) == list(history.spec) != list(reversed_weights)


def test_resuming_without_the_velocity_gives_other_weights(history: History) -> None:
    # Prepare: the velocity matters in this run (what the test above relies on)
    checkpoint = history.checkpoint(1)
    assert checkpoint.velocity is not None
    # Execute
    weights = resumed_weights(history, Checkpoint(1, checkpoint.weights, None))
    # Assert
    expected = history.models.weights(ROUNDS + 1, history.state, history.blobs.update_of)
    assert expected is not None
    assert digest_of(weights) != digest_of(expected)


def test_newest_checkpoint_the_chain_vouches_for_wins(history: History, tmp_path: Path) -> None:
    # Prepare
    for rnd in (1, 2, 3):
        write_checkpoint(tmp_path, history.checkpoint(rnd))
    # Execute
    found, warnings = newest(history, tmp_path)
    # Assert
    assert (found, warnings) == (3, [])


def test_checkpoint_whose_digest_differs_from_the_chain_is_ignored(
    history: History, tmp_path: Path
) -> None:
    # Prepare: round 2's checkpoint with one weight changed (well-formed otherwise)
    write_checkpoint(tmp_path, history.checkpoint(1))
    good = history.checkpoint(2)
    altered = OrderedDict((name, t.clone()) for name, t in good.weights.items())
    next(iter(altered.values()))[0] += 1.0
    write_checkpoint(tmp_path, Checkpoint(2, altered, good.velocity))
    # Execute
    found, warnings = newest(history, tmp_path)
    # Assert: falls back to round 1
    assert found == 1
    assert len(warnings) == 1
    assert "round-0002.pt" in warnings[0]
    assert "digest" in warnings[0]


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda data: b"not a checkpoint", id="garbage"),
        pytest.param(lambda data: data[: len(data) // 2], id="truncated"),
        pytest.param(lambda data: b"", id="empty"),
    ],
)
def test_corrupt_checkpoint_is_ignored_without_a_traceback(
    history: History, tmp_path: Path, damage: object
) -> None:
    # Prepare
    write_checkpoint(tmp_path, history.checkpoint(1))
    path = write_checkpoint(tmp_path, history.checkpoint(2))
    path.write_bytes(damage(path.read_bytes()))  # type: ignore[operator]
    # Execute
    found, warnings = newest(history, tmp_path)
    # Assert
    assert found == 1
    assert len(warnings) == 1
    assert warnings[0].startswith("checkpoint round-0002.pt ignored: unreadable")
    assert "Traceback" not in warnings[0]
    assert "\n" not in warnings[0]


class _MakesDirectory:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (os.mkdir, (str(self.path),))


def test_checkpoint_that_would_run_code_is_not_loaded(history: History, tmp_path: Path) -> None:
    # Prepare: a pickle that calls os.mkdir when unpickled
    write_checkpoint(tmp_path, history.checkpoint(1))
    marker = tmp_path / "code-ran"
    hostile = {"round": 2, "weights": _MakesDirectory(marker)}
    torch.save(hostile, checkpoint_path(tmp_path, 2))
    # Execute
    found, warnings = newest(history, tmp_path)
    # Assert
    assert found == 1
    assert not marker.exists()
    assert "round-0002.pt ignored: unreadable" in warnings[0]


def test_checkpoint_newer_than_the_last_summary_is_not_trusted(
    history: History, tmp_path: Path
) -> None:
    # Prepare: round 2's checkpoint is right, but its summary has not committed
    write_checkpoint(tmp_path, history.checkpoint(1))
    write_checkpoint(tmp_path, history.checkpoint(2))
    # Execute
    found, warnings = newest(history, tmp_path, summaries=history.summaries(last=1))
    # Assert
    assert found == 1
    assert len(warnings) == 1
    assert "no committed summary" in warnings[0]


def test_checkpoint_without_the_velocity_of_a_momentum_run_is_ignored(
    history: History, tmp_path: Path
) -> None:
    # Prepare
    write_checkpoint(tmp_path, history.checkpoint(1))
    write_checkpoint(tmp_path, Checkpoint(2, history.checkpoint(2).weights, None))
    # Execute
    found, warnings = newest(history, tmp_path)
    # Assert
    assert found == 1
    assert "velocity" in warnings[0]


def test_no_usable_checkpoint_means_none(history: History, tmp_path: Path) -> None:
    # Prepare: a checkpoint from another history (its digest is not on this chain)
    other = Checkpoint(1, initial_weights(CONFIG), torch.zeros_like(history.checkpoint(1).velocity))
    write_checkpoint(tmp_path, other)
    # Execute
    found, warnings = newest(history, tmp_path)
    # Assert
    assert found is None
    assert len(warnings) == 1


def test_server_resumes_its_models_after_the_checkpoint(
    genesis: Genesis, identities: dict[str, Identity], history: History, tmp_path: Path
) -> None:
    # Prepare: a server whose chain holds the summaries of rounds 1 and 2
    server_genesis = Genesis(
        protocol=genesis.protocol, selection=genesis.selection, run=CONFIG, nodes=genesis.nodes
    )
    test = Split(x=torch.zeros(10, 1, 28, 28), y=torch.zeros(10, dtype=torch.int64))
    server = Server(
        server_genesis, identities["server"], run_dir=tmp_path, test=test, log=NodeLog("server")
    )
    server.state.summaries.update(history.summaries(last=2))  # as the fixture's verdicts
    for rnd in (1, 2):
        write_checkpoint(server.checkpoint_dir, history.checkpoint(rnd))
    # Execute
    resumed = server.resume_from_checkpoint()
    # Assert: round 3 starts from round 2's checkpoint; rounds 1-2 are not recomputed
    assert resumed == 2
    assert server.models.first == 3
    weights = server.models.weights(3, server.state, server.blobs.update_of)
    assert weights is not None
    assert digest_of(weights) == history.summaries()[2].model_digest
