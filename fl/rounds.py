"""One federated round, as steps the simulator and the network nodes share.

- ``select_round`` (server): which clients take part in round r.
- ``local_update`` (client): train the global model on the client's shard and
  return the update (new weights minus global weights).
- ``aggregate_round`` (server): combine the accepted updates into the next
  global model.

Every random draw is derived from the run seed and what is being done
(``fl.seeds``), so results do not depend on process layout or order.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fl.aggregation import aggregate
from fl.config import RunConfig
from fl.data import Split
from fl.models import FLModel
from fl.partition import ShardSummary, partition, summarize
from fl.seeds import numpy_generator, torch_generator
from fl.training import TrainConfig, train_local
from fl.weights import Weights, flatten, set_weights, unflatten


def client_id(index: int) -> str:
    return f"client-{index:03d}"


@dataclass(frozen=True)
class ClientData:
    """A client's private shard (views into the training tensors)."""

    client: str
    x: torch.Tensor
    y: torch.Tensor

    @property
    def n_samples(self) -> int:
        return int(self.y.shape[0])

    def summary(self) -> ShardSummary:
        return summarize(self.y.numpy())


@dataclass(frozen=True)
class Federation:
    """Every client's shard, partitioned deterministically from the run seed."""

    clients: OrderedDict[str, ClientData]

    @classmethod
    def create(cls, config: RunConfig, train: Split) -> Federation:
        shards = partition(
            dist=config.dist,  # type: ignore[arg-type]
            labels=train.y.numpy(),
            num_clients=config.clients,
            rng=numpy_generator(config.seed, "partition"),
            alpha=config.alpha,
        )
        clients: OrderedDict[str, ClientData] = OrderedDict()
        for i, idx in enumerate(shards):
            index = torch.from_numpy(idx)
            clients[client_id(i)] = ClientData(client_id(i), train.x[index], train.y[index])
        return cls(clients)

    def client(self, cid: str) -> ClientData:
        return self.clients[cid]

    @property
    def ids(self) -> list[str]:
        return list(self.clients)


@dataclass(frozen=True)
class ClientUpdate:
    client: str
    round: int
    delta: OrderedDict[str, torch.Tensor]
    n_samples: int
    train_loss: float


def select_round(config: RunConfig, federation: Federation, rnd: int) -> list[str]:
    """Uniform sampling of ``frac * clients`` clients (the FedAvg control)."""
    ids = federation.ids
    rng = numpy_generator(config.seed, "select", rnd)
    chosen = rng.choice(len(ids), size=config.clients_per_round, replace=False)
    return sorted(ids[i] for i in np.sort(chosen))


def local_update(
    model: FLModel,
    global_weights: Weights,
    data: ClientData,
    *,
    round: int,
    seed: int,
    train: TrainConfig,
) -> ClientUpdate:
    """Train ``model`` (reset to the global weights) on the client's shard."""
    set_weights(model, global_weights)
    generator = torch_generator(seed, "train", round, data.client)
    stats = train_local(model, data.x, data.y, config=train, generator=generator)
    delta = OrderedDict(
        (name, param.detach() - global_weights[name]) for name, param in model.named_parameters()
    )
    return ClientUpdate(
        client=data.client,
        round=round,
        delta=delta,
        n_samples=data.n_samples,
        train_loss=stats.mean_loss,
    )


def aggregate_round(
    config: RunConfig, global_weights: Weights, updates: Sequence[ClientUpdate]
) -> OrderedDict[str, torch.Tensor]:
    """Apply the aggregate of ``updates`` (in client-id order) to the global weights."""
    if not updates:
        return OrderedDict((k, v.clone()) for k, v in global_weights.items())
    ordered = sorted(updates, key=lambda u: u.client)
    stacked = torch.stack([flatten(u.delta) for u in ordered])
    combined = aggregate(config.aggregation, stacked, weights=[u.n_samples for u in ordered])
    return unflatten(flatten(global_weights) + combined, global_weights)
