"""The global model of every round, recomputed from the chain (pure: no I/O).

Round 1 starts from the seeded initial model, and round r+1 from
``fl.rounds.aggregate_round`` over the updates the committed verdicts of
round r accepted. The simulator, the miners (to validate updates and to
check the server's round summary) and the server (to aggregate) all call
:class:`GlobalModels`; where the accepted updates' tensors come from is the
caller's business (``fetch``: the simulator's memory, a miner's blob store),
and the weight of each update is the record count the chain holds for it.
A restarted server can :meth:`GlobalModels.resume` from a checkpoint whose
digest the chain vouches for, so that it aggregates only the rounds after it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch

from chain.digests import ModelSpec, model_spec, weights_digest
from chain.records import UpdateRecord
from chain.state import ChainState
from fl.config import RunConfig
from fl.models import model_for
from fl.rounds import ClientUpdate, aggregate_round
from fl.seeds import torch_generator
from fl.weights import get_weights

FetchUpdate = Callable[[UpdateRecord], ClientUpdate | None]
"""The tensors of an accepted update record (None while they are not at hand)."""


def initial_weights(config: RunConfig) -> OrderedDict[str, torch.Tensor]:
    """The round-1 global model: the seeded initial model."""
    return get_weights(model_for(config, generator=torch_generator(config.seed, "init")))


def initial_spec(config: RunConfig) -> ModelSpec:
    """Names, dtypes and shapes of the run's model: what every tensor stream must carry."""
    return model_spec(initial_weights(config))


class GlobalModels:
    """Global weights at the start of each round, recomputed from the chain."""

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

    def weights(self, rnd: int, state: ChainState, fetch: FetchUpdate) -> OrderedDict | None:
        """Weights for round ``rnd`` (None while a needed update or verdict is missing)."""
        if rnd < self.first:
            raise ValueError(f"round {rnd} is before round {self.first}, where this resumed")
        top = max(self._weights)
        while top < rnd:
            verdicts = state.verdicts.get(top)
            if verdicts is None:
                return None
            updates = [fetch(u) for u in verdicts.updates if u.accepted]
            if any(u is None for u in updates):
                return None
            weights, velocity = aggregate_round(
                self.config,
                self._weights[top],
                [u for u in updates if u is not None],
                rnd=top,
                velocity=self._velocity[top],
            )
            self._weights[top + 1] = weights
            self._velocity[top + 1] = velocity
            top += 1
        return self._weights[rnd]

    def digest(self, rnd: int, state: ChainState, fetch: FetchUpdate) -> bytes | None:
        if rnd not in self._digests:
            weights = self.weights(rnd, state, fetch)
            if weights is None:
                return None
            self._digests[rnd] = weights_digest(weights)
        return self._digests[rnd]
