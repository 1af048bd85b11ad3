"""One federated round, as steps the simulator and the network nodes share.

- ``registration_histogram`` (client, through ``Federation.create``): the
  noisy label histogram each client releases once (its data summary on the
  chain).
- ``select_round`` (server): Algorithm 1 (or uniform sampling, the control).
- ``ClientState.participate`` (client): account the privacy spend, train
  (with DP when configured), and return the update.
- ``validate_round`` (miners): hard checks (copies of seen updates included)
  plus Algorithm 2.
- ``aggregate_round`` (server): combine the accepted updates.

Every random draw is derived from the run seed and what is being done
(``fl.seeds``), so results do not depend on process layout or order, except
the DP noise and sampling mask: those come from ``fl.privacy.SecretNoise``
unless the run asks for ``reproducible_noise`` (tests and testbeds only).
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from fl.aggregation import aggregate, fedavg_weights
from fl.attacks import attack_of, choose_malicious
from fl.config import RunConfig
from fl.copies import RoundHistory
from fl.datasets import Split, dataset_of
from fl.models import FLModel, count_parameters, model_for
from fl.partition import partition
from fl.privacy import (
    BudgetExhausted,
    DPConfig,
    NoiseSource,
    PrivacyAccountant,
    PrivacyPlan,
    SecretNoise,
    SeededNoise,
    fit_histogram,
    history_epsilon,
    mechanism_of,
    merged,
    plan_privacy,
    public_schedule,
    release_histogram,
    released_count,
)
from fl.reputation import ReputationParams
from fl.seeds import numpy_generator, torch_generator
from fl.selection import (
    DataSummary,
    SelectionParams,
    select_clients,
    self_assessment,
    summary_from_histogram,
)
from fl.training import TrainConfig, subspace_projection, train_local, train_local_dp
from fl.validation import ValidationParams, Verdict, validate_updates
from fl.weights import Weights, flatten, set_weights, unflatten


def client_id(index: int) -> str:
    return f"client-{index:03d}"


def train_config(config: RunConfig) -> TrainConfig:
    return TrainConfig(
        epochs=config.local_epochs,
        batch_size=config.batch_size,
        lr=config.lr,
        momentum=config.momentum,
        dropout=config.dropout,
        augmentations=config.dp_augmentations,
        pad_value=dataset_of(config).pad_value,
    )


def dp_config(config: RunConfig) -> DPConfig:
    return DPConfig(
        mechanism=config.dp,  # type: ignore[arg-type]
        epsilon=config.epsilon,
        delta=config.delta,
        clip=config.clip,
        max_participations=config.participations_budget,
        registration_share=config.dp_registration_share,
        accountant=config.dp_accountant,
    )


def privacy_plan(config: RunConfig) -> PrivacyPlan:
    """The run's privacy plan, from public settings only (every node derives the same)."""
    sample_rate, steps = public_schedule(
        expected_records=config.expected_records,
        batch_size=config.batch_size,
        local_epochs=config.local_epochs,
    )
    return plan_privacy(dp_config(config), sample_rate=sample_rate, steps=steps)


def participation_noise(config: RunConfig, *, round: int, client: str) -> NoiseSource:
    """Where one participation's noise and sampling mask come from.

    Secret (the operating system's CSPRNG) unless the run asks for
    reproducible noise; that seeded source is exactly what anyone holding
    the run seed can regenerate, which is why it is for tests only.
    """
    if config.reproducible_noise:
        return SeededNoise(torch_generator(config.seed, "noise", round, client))
    return SecretNoise()


def registration_noise(config: RunConfig, *, client: str) -> NoiseSource:
    """Where the noise of a client's registration histogram comes from (as above)."""
    if config.reproducible_noise:
        return SeededNoise(torch_generator(config.seed, "registration", client))
    return SecretNoise()


def replace_one_epsilon(config: RunConfig) -> float:
    """The run's total epsilon read under replace-one adjacency instead of add/remove-one.

    Replacing a record is removing one and adding one: the clipped gradient
    sum moves by up to ``2C`` (so every noise multiplier halves) and the
    histogram changes two bins by one (L2 ``sqrt 2``, L1 2). Laplace releases
    are pure DP, so the total doubles. For Gaussian the composition is
    recomputed with the halved multipliers, which is exact at ``q = 1``;
    the Poisson-subsampled case needs its own replace-one analysis, so it
    is refused.
    """
    dp = dp_config(config)
    return mechanism_of(config).replace_one_epsilon(
        privacy_plan(config), participations=dp.max_participations, delta=dp.delta
    )


def privacy_report(config: RunConfig) -> dict[str, object]:
    """The privacy plan in force, for metrics files and ``privacy plan``."""
    plan = privacy_plan(config)
    dp = dp_config(config)
    mechanism = mechanism_of(config)
    out: dict[str, object] = {
        "mechanism": config.dp,
        "adjacency": "add/remove one record",
        "noise": "reproducible (NO PRIVACY)" if config.reproducible_noise else "secret",
    }
    if mechanism.is_none:
        return out
    one = [plan.step.release]
    full = merged([plan.registration] + [plan.step.release] * dp.max_participations)
    accountants = mechanism.accountants
    out.update(
        {
            "epsilon": config.epsilon,
            "delta": mechanism.delta(config.delta),
            "accountant": plan.accountant,
            "participations": dp.max_participations,
            "sample_rate": plan.step.sample_rate,
            "steps": plan.step.steps,
            "noise_multiplier_or_eps0": plan.step.noise_multiplier_or_eps0,
            "histogram_sd": plan.histogram_sd,
            "registration_share": config.dp_registration_share,
            "epsilon_per_participation": {
                a: history_epsilon(dp.mechanism, one, delta=dp.delta, accountant=a)
                for a in accountants
            },
            "epsilon_total": {
                a: history_epsilon(dp.mechanism, full, delta=dp.delta, accountant=a)
                for a in accountants
            },
        }
    )
    return out


def validation_params(config: RunConfig) -> ValidationParams:
    return ValidationParams(
        rule=config.val_rule,
        mad_k=config.val_k,
        min_accuracy=config.val_threshold,
        norm_bound=config.norm_bound,
        norm_spread=config.val_norm_spread,
        cosine_spread=config.val_cosine_spread,
        reference_cosine=config.val_reference_cosine,
        reference_clip=config.clip,
    )


def reputation_params(config: RunConfig) -> ReputationParams:
    return ReputationParams(z=config.freshness, threshold=config.rep_threshold)


def nominal_max_samples(config: RunConfig) -> int:
    """The data size that scores 1.0 in self-assessment: twice an equal share."""
    return max(1, 2 * config.train_size // config.clients)


# The default record cap, in equal shares of the training set: above the
# largest honest shard of typical non-IID splits (Dirichlet alpha 0.5 over 100
# clients: about 2.3 shares, at most 2.9 over ten seeds).
RECORD_CAP_SHARES = 4


def record_cap(config: RunConfig) -> int:
    """The largest record count a registration may claim (``--max-records``).

    Public (it follows from the genesis alone), so clients fit their noisy
    release into it at no privacy cost (``fl.privacy.fit_histogram``) and the
    chain refuses any registration above it (``chain.admission``).
    """
    if config.max_records is not None:
        return config.max_records
    return RECORD_CAP_SHARES * config.expected_records


@dataclass(frozen=True)
class ClientUpdate:
    client: str
    round: int
    delta: OrderedDict[str, torch.Tensor]
    n_samples: int
    train_loss: float


@dataclass
class ClientState:
    """One client: its private shard, its released histogram, behaviour and privacy accountant.

    ``histogram`` is what the client's registration released (noisy under
    DP); ``summary`` and ``released_records`` (the public divisor of its DP
    steps and its FedAvg weight) are derived from it, never from the exact
    shard size.
    """

    client: str
    x: torch.Tensor
    y: torch.Tensor
    histogram: tuple[int, ...]
    attack: str | None
    accountant: PrivacyAccountant
    plan: PrivacyPlan = field(repr=False)
    projection: torch.Tensor | None = field(default=None, repr=False)

    @property
    def n_samples(self) -> int:
        """The exact shard size: private, never released."""
        return int(self.y.shape[0])

    @property
    def released_records(self) -> int:
        return released_count(self.histogram)

    @property
    def summary(self) -> DataSummary:
        return summary_from_histogram(
            self.client, self.histogram, class_threshold=self.plan.class_threshold
        )

    def declines(self) -> bool:
        """True when one more participation would exceed the privacy budget."""
        return self.accountant.would_exceed()

    def participate(
        self,
        model: FLModel,
        global_weights: Weights,
        *,
        round: int,
        config: RunConfig,
        noise: NoiseSource | None = None,
    ) -> ClientUpdate | None:
        """Account the spend, train on the global model and return the update.

        None: the client sends nothing (a silent attacker). The spend is
        recorded before training starts, so no release is ever unaccounted;
        :class:`BudgetExhausted` when it would exceed the budget. ``noise``
        defaults to :func:`participation_noise`.
        """
        attack = None if self.attack is None else attack_of(self.attack)
        if attack is not None and attack.silent:
            return None
        if self.declines():
            raise BudgetExhausted(f"{self.client}: privacy budget exhausted")
        self.accountant.record_participation()
        set_weights(model, global_weights)
        gen = torch_generator(config.seed, "train", round, self.client)
        if attack is not None:
            y = attack.labels(self.y, num_classes=dataset_of(config).num_classes, generator=gen)
        else:
            y = self.y
        if mechanism_of(config).is_none:
            stats = train_local(model, self.x, y, config=train_config(config), generator=gen)
        else:
            stats = train_local_dp(
                model,
                self.x,
                y,
                config=train_config(config),
                dp=self.accountant.config,
                plan=self.plan.step,
                released_records=self.released_records,
                noise=noise or participation_noise(config, round=round, client=self.client),
                generator=gen,
                projection=self.projection,
            )
        delta = OrderedDict(
            (name, param.detach() - global_weights[name])
            for name, param in model.named_parameters()
        )
        if attack is not None:
            delta = attack.update(delta, generator=gen)
        return ClientUpdate(self.client, round, delta, self.released_records, stats.mean_loss)


@dataclass
class Federation:
    """Every client, partitioned deterministically from the run seed."""

    clients: OrderedDict[str, ClientState]
    malicious: list[str]

    @classmethod
    def create(
        cls, config: RunConfig, train: Split, *, only: Collection[str] | None = None
    ) -> Federation:
        """The whole federation, or with ``only`` just those clients' states.

        The partition and the malicious draw always cover every client (they
        depend on the run seed alone); ``only`` keeps a client process from
        copying the shards of clients it does not host.
        """
        shards = partition(
            dist=config.dist,  # type: ignore[arg-type]
            labels=train.y.numpy(),
            num_clients=config.clients,
            rng=numpy_generator(config.seed, "partition"),
            alpha=config.alpha,
        )
        ids = [client_id(i) for i in range(len(shards))]
        malicious = choose_malicious(
            ids, fraction=config.malicious, rng=numpy_generator(config.seed, "malicious")
        )
        dp = dp_config(config)
        plan = privacy_plan(config)
        projection = public_projection(config)
        clients: OrderedDict[str, ClientState] = OrderedDict()
        for cid, idx in zip(ids, shards, strict=True):
            if only is not None and cid not in only:
                continue
            index = torch.from_numpy(idx)
            x, y = train.x[index], train.y[index]
            attack = config.attack if cid in malicious else None
            accountant = PrivacyAccountant(dp, plan)
            accountant.record_registration()
            histogram = registration_histogram(
                y,
                attack=attack,
                config=config,
                plan=plan,
                noise=registration_noise(config, client=cid),
            )
            clients[cid] = ClientState(cid, x, y, histogram, attack, accountant, plan, projection)
        return cls(clients, malicious)

    def client(self, cid: str) -> ClientState:
        return self.clients[cid]

    @property
    def ids(self) -> list[str]:
        return list(self.clients)

    def self_scores(self, config: RunConfig) -> dict[str, float]:
        return {
            cid: self_assessment(
                c.summary,
                max_samples=nominal_max_samples(config),
                num_classes=dataset_of(config).num_classes,
            )
            for cid, c in self.clients.items()
        }


def public_projection(config: RunConfig) -> torch.Tensor | None:
    """The run's shared random subspace for ``--dp-subspace`` (derived from the seed, public)."""
    if mechanism_of(config).is_none or config.dp_subspace == 0:
        return None
    params = count_parameters(model_for(config, generator=torch.Generator()))
    return subspace_projection(
        params=params, dim=config.dp_subspace, generator=torch_generator(config.seed, "subspace")
    )


def registration_histogram(
    y: torch.Tensor,
    *,
    attack: str | None,
    config: RunConfig,
    plan: PrivacyPlan,
    noise: NoiseSource,
) -> tuple[int, ...]:
    """What a client's registration releases: its noisy label histogram, fitted to the cap.

    An attack may register something else (``--attack lie`` claims twice
    the equal share, spread over every class, with no invalid label,
    whatever its data holds; ``--attack inflate`` claims the cap). Either
    way the release is fitted into the run's record cap
    (``fl.privacy.fit_histogram``), which is what the chain admits.
    """
    num_classes = dataset_of(config).num_classes
    cap = record_cap(config)
    claimed = None
    if attack is not None:
        claimed = attack_of(attack).registration(
            claimed_records=nominal_max_samples(config), max_records=cap, num_classes=num_classes
        )
    if claimed is None:
        claimed = release_histogram(y, num_classes=num_classes, plan=plan, noise=noise)
    return fit_histogram(claimed, cap=cap)


def selection_seed(config: RunConfig, rnd: int) -> bytes:
    """The run-derived selection seed: the simulator's, and the network's with
    ``selection_seed = "run"`` (by default the network uses the hash of the
    block that closed the previous round)."""
    return hashlib.sha256(
        b"LLBCFL/sim-seed/v1" + config.seed.to_bytes(8, "big", signed=True) + rnd.to_bytes(8, "big")
    ).digest()


def select_round(
    config: RunConfig,
    *,
    rnd: int,
    self_scores: Mapping[str, float],
    reputations: Mapping[str, float] | None,
    declined: Collection[str],
    seed: bytes,
) -> list[str]:
    """The clients selected for round ``rnd`` (sorted ids)."""
    n = config.clients_per_round
    if config.selection == "random":
        eligible = sorted(c for c in self_scores if c not in declined)
        rng = np.random.default_rng(int.from_bytes(hashlib.sha256(seed).digest()[:8], "big"))
        chosen = rng.choice(len(eligible), size=min(n, len(eligible)), replace=False)
        return sorted(eligible[i] for i in chosen)
    params = SelectionParams(n=n, mode=config.selection, threshold=config.rep_threshold)  # type: ignore[arg-type]
    return select_clients(
        round=rnd,
        self_scores=self_scores,
        reputations=reputations if rnd > 1 else None,
        declined=declined,
        params=params,
        seed=seed,
    )


def validate_round(
    config: RunConfig,
    *,
    model: FLModel,
    global_weights: Weights,
    updates: Sequence[ClientUpdate],
    validation: Split,
    history: RoundHistory,
) -> dict[str, Verdict]:
    """Verdicts for the round; with ``--no-validation`` every update is accepted.

    ``history``: the chain's earlier updates and this round's digests, which
    the copy check compares the updates with (``fl.copies``; built by
    ``chain.verdicts.round_history``).
    """
    if not config.validation:
        return {u.client: Verdict(u.client, True, "accepted: validation disabled") for u in updates}
    return validate_updates(
        model=model,
        global_weights=global_weights,
        updates=[(u.client, u.delta) for u in updates],
        x_val=validation.x,
        y_val=validation.y,
        params=validation_params(config),
        history=history,
    )


# The cosine schedule ends at this fraction of --server-lr in the last round.
COSINE_FINAL_FRACTION = 0.1


def server_step_size(config: RunConfig, rnd: int) -> float:
    """The server's step size in round ``rnd`` (1-based) under ``--server-lr-decay``.

    ``cosine`` falls from ``server_lr`` in round 1 to
    ``COSINE_FINAL_FRACTION * server_lr`` in the last round. The schedule is
    applied to aggregates the DP clients already privatised, so it costs no
    privacy; under DP a smaller late step averages the noise of more rounds.
    """
    if config.server_lr_decay == "none" or config.rounds == 1:
        return config.server_lr
    progress = min(1.0, max(0.0, (rnd - 1) / (config.rounds - 1)))
    floor = COSINE_FINAL_FRACTION
    return config.server_lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def aggregate_round(
    config: RunConfig,
    global_weights: Weights,
    updates: Sequence[ClientUpdate],
    *,
    rnd: int,
    velocity: torch.Tensor | None = None,
) -> tuple[OrderedDict[str, torch.Tensor], torch.Tensor | None]:
    """Apply the aggregate of round ``rnd``'s ``updates`` (in client-id order) to the weights.

    FedAvg weighs each update by its record count bounded by
    ``fl.aggregation.fedavg_weights`` (the record cap and twice the round's
    lower median): the one weight rule of the simulator, the miners and the
    server.

    With ``--server-momentum b`` > 0 the server keeps a velocity
    ``v <- b * v + aggregate`` and steps ``global += server_lr * v`` (FedAvgM,
    Hsu et al. 2019); ``server_lr = 1 - b`` makes the step an exponential
    average of recent rounds, which damps the swings of non-IID selections.
    The step size follows ``server_step_size`` (constant unless
    ``--server-lr-decay``). Returns the new weights and the new velocity
    (None without momentum).
    """
    flat = flatten(global_weights)
    if updates:
        ordered = sorted(updates, key=lambda u: u.client)
        stacked = torch.stack([flatten(u.delta) for u in ordered])
        weights = fedavg_weights([u.n_samples for u in ordered], cap=record_cap(config))
        step = aggregate(config.aggregation, stacked, weights=weights)
    else:
        step = torch.zeros_like(flat)
    if config.server_momentum > 0:
        velocity = step if velocity is None else config.server_momentum * velocity + step
        step = velocity
    lr = server_step_size(config, rnd)
    if lr != 1.0:
        step = lr * step
    return unflatten(flat + step, global_weights), velocity
