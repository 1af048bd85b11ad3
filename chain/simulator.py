"""The in-process simulator: the whole federated loop in one process, on the chain.

The simulator runs the application the miners agree on: it drives a
:class:`chain.state.ChainState` through :class:`chain.sequencer.Sequencer`
(one replica, no network), with the same records, the same transition
table and the same bookkeeping (selection from the chain, silent clients,
reputations, privacy spent) as the network; its verdict records are built
by ``chain.verdicts.build_verdicts`` and its global models recomputed by
``chain.models.GlobalModels``, as the miners and the server do. So a run
here and a run of the multi-process network with the same seed (and
``selection_seed = "run"``) select, accept and aggregate the same updates
by construction. The simulator stands in for every role at once: the
clients train (``fl.rounds.ClientState.participate``), a miner validates
(``fl.rounds.validate_round``, with the copy check's history from
``chain.verdicts.round_history``, as a miner), the server evaluates. Time comes in
through an injected ``clock`` (the package reads no clock of its own).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from chain.digests import weights_digest
from chain.metrics import RoundRecord, metrics_document, round_record
from chain.models import GlobalModels
from chain.records import Registration, RoundSummary, UpdateRecord
from chain.sequencer import Sequencer
from chain.state import ChainState
from chain.verdicts import Upload, build_verdicts, own_verdicts, round_history
from fl.config import RunConfig
from fl.copies import COPY_WINDOW
from fl.datasets import Splits
from fl.models import model_for
from fl.rounds import ClientUpdate, Federation, validate_round
from fl.seeds import torch_generator
from fl.training import evaluate
from fl.weights import set_weights

SERVER = "server"
MINER = "miner-0"


def simulate_rounds(
    config: RunConfig,
    splits: Splits,
    *,
    clock: Callable[[], float],
    federation: Federation | None = None,
) -> Iterator[RoundRecord]:
    """Yield one record per round; the caller decides when to stop."""
    federation = federation or Federation.create(config, splits.train)
    state = ChainState(config, clients=tuple(federation.ids), selection_seed="run")
    chain = Sequencer(state)
    for cid, client in federation.clients.items():
        chain.commit(cid, Registration(cid, tuple(client.histogram)))
    model = model_for(config, generator=torch_generator(config.seed, "init"))
    models = GlobalModels(config)
    held: dict[tuple[bytes, str], ClientUpdate] = {}

    def fetch(u: UpdateRecord) -> ClientUpdate | None:
        return held.get((u.digest, u.client))

    for rnd in range(1, config.rounds + 1):
        t0 = clock()
        global_weights = models.weights(rnd, state, fetch)
        assert global_weights is not None
        base = models.digest(rnd, state, fetch)
        assert base is not None
        selection = state.expected_selection(rnd)
        chain.commit(SERVER, selection)
        sent = [
            u
            for cid in selection.selected
            if (
                u := federation.client(cid).participate(
                    model, global_weights, round=rnd, config=config
                )
            )
            is not None
        ]
        uploads = {}
        for u in sent:
            digest = weights_digest(u.delta)
            held[(digest, u.client)] = u
            uploads[u.client] = Upload(u.client, rnd, digest, base, u.n_samples, b"")
        history = round_history(
            state,
            rnd,
            base_digest=base,
            digests={cid: up.digest for cid, up in uploads.items()},
            fetch=fetch,
        )
        assert history is not None
        verdicts = validate_round(
            config,
            model=model,
            global_weights=global_weights,
            updates=sent,
            validation=splits.validation,
            history=history,
        )
        record = build_verdicts(state, rnd, held=uploads, own=own_verdicts(verdicts), malformed={})
        chain.commit(MINER, record)
        new_weights = models.weights(rnd + 1, state, fetch)
        assert new_weights is not None
        # The next rounds start from new_weights; the copy check compares the
        # next round with this one's and the previous COPY_WINDOW - 1 rounds' updates.
        held = {k: u for k, u in held.items() if u.round > rnd - COPY_WINDOW}
        set_weights(model, new_weights)
        loss, acc = evaluate(model, splits.test.x, splits.test.y)
        chain.commit(SERVER, RoundSummary(rnd, weights_digest(new_weights), acc, loss))
        yield round_record(state, rnd, seconds=clock() - t0)


def run_simulation(
    config: RunConfig,
    splits: Splits,
    *,
    clock: Callable[[], float],
    until: Callable[[RoundRecord], bool] | None = None,
) -> dict[str, Any]:
    """Run every round (or until ``until(record)`` is true); return the metrics document."""
    start = clock()
    federation = Federation.create(config, splits.train)
    records: list[RoundRecord] = []
    for record in simulate_rounds(config, splits, clock=clock, federation=federation):
        records.append(record)
        if until is not None and until(record):
            break
    return metrics_document(
        config, records, total_seconds=clock() - start, malicious_clients=federation.malicious
    )
