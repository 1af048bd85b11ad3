"""An empirical privacy audit of one client's update, run through the real client code.

The auditor plays the distinguishing game of differential privacy
(Jagielski, Ullman, Oprea, NeurIPS 2020; Nasr et al., "Tight Auditing of
Differentially Private Machine Learning", USENIX Security 2023) against
``fl.rounds.ClientState.participate``: in each trial the client holds its
records ``D``, or ``D`` plus one canary record (add/remove-one neighbours),
trains one participation, and releases its update. The auditor is as strong
as the threat model allows and more: it knows the global model, ``D``, the
canary, the plan and everything in the genesis and on the chain, but not
the client's secret noise. It guesses, trial by trial, whether the canary
was in, with two statistics:

``white-box``
    the log-likelihood ratio of the update's residual (the update minus the
    noise-free update without the canary, which the auditor computes itself)
    against the canary's noise-free contribution: a projection for Gaussian
    noise, the Laplace likelihood ratio coordinate by coordinate (in the
    public subspace, if there is one) for Laplace noise;
``regenerated-noise``
    the same after subtracting the noise regenerated from public information
    (the run seed, the round and the client id): exactly what a curious miner
    or server would try. With reproducible (public) noise it removes the
    noise completely and the guesses become perfect; with secret noise it
    only adds noise.

The false positive and negative rates get one-sided Clopper-Pearson upper
bounds, and ``epsilon >= log((1 - delta - FNR) / FPR)`` (and symmetrically)
gives an empirical lower bound on the release's epsilon that holds for any
mechanism (``model_free``); its threshold is chosen on a first part of the
trials and the errors counted on the rest, so the choice does not inflate
the bound. For one full-batch Gaussian step the release is exactly a
Gaussian mechanism, whose trade-off curve is that of ``mu``-Gaussian DP
(Dong, Roth, Su 2022): the rates at the threshold fixed in advance (the
midpoint of the two hypotheses) bound ``mu`` from below, and the bound
converts to epsilon at ``delta`` exactly (``gdp``), far tighter for the same
number of trials. The headline bound (``gdp`` for Gaussian, ``model_free``
for Laplace) is compared with the epsilon the accountant claims for one
participation.

Pure: the trials call the client code on tensors; nothing here reads files,
sockets or clocks. The only unseeded randomness is the client's own secret
noise, which is what is being audited.
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats

from fl.config import RunConfig
from fl.datasets import dataset_of
from fl.models import FLModel
from fl.privacy import (
    PrivacyAccountant,
    PrivacyPlan,
    history_epsilon,
    mechanism_noise,
    mechanism_of,
)
from fl.rounds import (
    ClientState,
    dp_config,
    participation_noise,
    privacy_plan,
    public_projection,
)
from fl.seeds import numpy_generator
from fl.weights import Weights, flatten, set_weights

FAULTS: tuple[str, ...] = ("none", "halve-sensitivity")
ATTACKS: tuple[str, ...] = ("white-box", "regenerated-noise")
AUDITED_CLIENT = "client-000"
# The regenerated noise counts as the real noise when it explains the update
# to within this relative error (float32 rounding is about 1e-7).
REGENERATED_TOLERANCE = 1e-3


@dataclass(frozen=True)
class ErrorCounts:
    """Test-trial outcomes of one attack: false positives among canary-out trials, etc."""

    false_positives: int
    negatives: int
    false_negatives: int
    positives: int


def clopper_pearson_upper(errors: int, trials: int, *, alpha: float) -> float:
    """One-sided upper confidence bound, at level ``1 - alpha``, on a binomial rate."""
    if trials < 1:
        raise ValueError("no trials")
    if errors >= trials:
        return 1.0
    return float(stats.beta.ppf(1 - alpha, errors + 1, trials - errors))


def epsilon_lower_bound(counts: ErrorCounts, *, delta: float, alpha: float) -> float:
    """The model-free bound: any (epsilon, delta)-DP mechanism has
    ``FPR + e^eps FNR >= 1 - delta`` and the same with the roles swapped.

    ``alpha`` is split over the two rates, so the bound holds with
    probability at least ``1 - alpha``.
    """
    fpr = clopper_pearson_upper(counts.false_positives, counts.negatives, alpha=alpha / 2)
    fnr = clopper_pearson_upper(counts.false_negatives, counts.positives, alpha=alpha / 2)
    best = 0.0
    for a, b in ((fpr, fnr), (fnr, fpr)):
        if a > 0 and 1 - delta - b > a:
            best = max(best, math.log((1 - delta - b) / a))
    return best


def gdp_mu_lower_bound(counts: ErrorCounts, *, alpha: float) -> float:
    """A lower bound on ``mu`` if the release is ``mu``-Gaussian DP.

    Its trade-off curve gives ``FNR >= Phi(Phi^-1(1 - FPR) - mu)``, so
    ``mu >= Phi^-1(1 - FPR) - Phi^-1(FNR)``; upper bounds on both rates make
    this a lower bound on ``mu``.
    """
    fpr = clopper_pearson_upper(counts.false_positives, counts.negatives, alpha=alpha / 2)
    fnr = clopper_pearson_upper(counts.false_negatives, counts.positives, alpha=alpha / 2)
    return max(0.0, float(stats.norm.ppf(1 - fpr) - stats.norm.ppf(fnr)))


def gdp_delta(epsilon: float, mu: float) -> float:
    """The delta at ``epsilon`` of ``mu``-Gaussian DP (Dong, Roth, Su 2022, Corollary 2.13)."""
    if mu <= 0:
        return 0.0
    return float(
        stats.norm.cdf(-epsilon / mu + mu / 2)
        - math.exp(epsilon) * stats.norm.cdf(-epsilon / mu - mu / 2)
    )


def gdp_epsilon(mu: float, *, delta: float) -> float:
    """The smallest epsilon at which ``mu``-Gaussian DP is (epsilon, delta)-DP."""
    if gdp_delta(0.0, mu) <= delta:
        return 0.0
    low, high = 0.0, 1.0
    while gdp_delta(high, mu) > delta:
        low, high = high, 2 * high
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (mid, high) if gdp_delta(mid, mu) > delta else (low, mid)
    return high


def _counts_at(out: np.ndarray, inn: np.ndarray, threshold: float) -> ErrorCounts:
    """Outcomes of guessing "in" at or above ``threshold``."""
    return ErrorCounts(
        false_positives=int((out >= threshold).sum()),
        negatives=len(out),
        false_negatives=int((inn < threshold).sum()),
        positives=len(inn),
    )


def _best_threshold(
    out: np.ndarray, inn: np.ndarray, bound: Callable[[ErrorCounts], float]
) -> float:
    """The threshold (guess "in" at or above it) whose ``bound`` on these trials is largest.

    Scoring candidates by the confidence bound itself, not by the plug-in
    estimate, prefers thresholds whose rates are well estimated over ones
    in a thin tail that won by luck.
    """
    values = np.unique(np.concatenate([out, inn]))
    # One candidate per distinct split of the trials: the midpoints between
    # neighbouring values (a perfect separation gets the middle of its gap).
    candidates = (values[1:] + values[:-1]) / 2 if len(values) > 1 else values
    scores = [bound(_counts_at(out, inn, float(t))) for t in candidates]
    return float(candidates[int(np.argmax(scores))])


def error_counts(
    statistic: np.ndarray,
    canary_in: np.ndarray,
    *,
    calibration: int,
    bound: Callable[[ErrorCounts], float],
) -> ErrorCounts:
    """Pick the threshold on the first ``calibration`` trials; count errors on the rest."""
    cal = slice(0, calibration)
    threshold = _best_threshold(
        statistic[cal][~canary_in[cal]], statistic[cal][canary_in[cal]], bound
    )
    test = slice(calibration, None)
    truth = canary_in[test]
    return _counts_at(statistic[test][~truth], statistic[test][truth], threshold)


# The game ---------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditSetup:
    """What one audit runs: the run's settings, the client's records, the canary, the model."""

    config: RunConfig
    x: torch.Tensor
    y: torch.Tensor
    canary_x: torch.Tensor  # [1, C, H, W]
    canary_y: torch.Tensor  # [1]
    model: FLModel
    weights: Weights
    fault: str = "none"

    def __post_init__(self) -> None:
        if self.fault not in FAULTS:
            raise ValueError(f"fault must be one of {FAULTS}, got {self.fault!r}")
        if mechanism_of(self.config).is_none:
            raise ValueError("an audit needs a DP mechanism (--dp gaussian or laplace)")
        step = privacy_plan(self.config).step
        if step.sample_rate != 1 or step.steps != 1 or self.config.dp_augmentations != 1:
            raise ValueError(
                "the audit replays one full-batch DP step: it needs --batch-size at least "
                "the clients' share of the data, --local-epochs 1 and no augmentation "
                f"(this setting has q = {step.sample_rate:.4g} and {step.steps} steps)"
            )
        if self.config.dropout:
            raise ValueError("the audit needs --no-dropout (the noise-free update must be fixed)")


def choose_canary(
    model: FLModel, weights: Weights, x: torch.Tensor, y: torch.Tensor, *, classes: int = 10
) -> int:
    """Index of the candidate whose gradient, with its label shifted by one, is largest.

    A mislabelled record has a large gradient, so clipping leaves it the full
    bound: the canary then moves the update as much as any record can.
    """
    set_weights(model, weights)
    model.eval()
    norms = []
    for i in range(len(y)):
        model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x[i : i + 1]), (y[i : i + 1] + 1) % classes)
        loss.backward()
        norms.append(float(torch.sqrt(sum((p.grad**2).sum() for p in model.parameters()))))
    model.zero_grad(set_to_none=True)
    return int(np.argmax(norms))


def _faulty_plan(plan: PrivacyPlan, fault: str) -> PrivacyPlan:
    if fault == "halve-sensitivity":
        # Noise calibrated as if one record could move the sum by only C / 2.
        step = dataclasses.replace(plan.step, noise_scale=plan.step.noise_scale / 2)
        return dataclasses.replace(plan, step=step)
    return plan


class AuditGame:
    """Trials of one participation with and without the canary, and their statistics."""

    def __init__(self, setup: AuditSetup) -> None:
        self.setup = setup
        self.config = setup.config
        self.plan = privacy_plan(self.config)
        self.projection = public_projection(self.config)
        # The divisor is public and the same under both hypotheses: the count
        # the client's registration released (here: its true count).
        self.histogram = (len(setup.y),) + (0,) * dataset_of(self.config).num_classes
        self.clean = self._update(canary=False, plan=self._noiseless(), round=0)
        self.contribution = self._update(canary=True, plan=self._noiseless(), round=0) - self.clean
        if self.projection is not None:
            pinv = torch.linalg.pinv(self.projection.double())
            self.to_subspace: Callable[[torch.Tensor], torch.Tensor] = lambda v: pinv @ v
        else:
            self.to_subspace = lambda v: v
        self.contribution_sub = self.to_subspace(self.contribution)

    def _noiseless(self) -> PrivacyPlan:
        return dataclasses.replace(
            self.plan, step=dataclasses.replace(self.plan.step, noise_scale=0.0)
        )

    def _state(self, *, canary: bool, plan: PrivacyPlan) -> ClientState:
        s = self.setup
        x = torch.cat([s.x, s.canary_x]) if canary else s.x
        y = torch.cat([s.y, s.canary_y]) if canary else s.y
        accountant = PrivacyAccountant(dp_config(self.config), plan)
        return ClientState(
            AUDITED_CLIENT, x, y, self.histogram, None, accountant, plan, self.projection
        )

    def _update(self, *, canary: bool, plan: PrivacyPlan, round: int) -> torch.Tensor:
        """One participation through the client code; the flat update, float64."""
        state = self._state(canary=canary, plan=plan)
        update = state.participate(
            self.setup.model, self.setup.weights, round=round, config=self.config
        )
        assert update is not None
        return flatten(OrderedDict(update.delta)).double()

    def release(self, *, canary: bool, round: int) -> torch.Tensor:
        """What the client releases in this trial (secret noise unless the run says otherwise)."""
        return self._update(
            canary=canary, plan=_faulty_plan(self.plan, self.setup.fault), round=round
        )

    def regenerated_noise(self, round: int) -> torch.Tensor:
        """The update's noise as a miner would regenerate it from the seed, round and client.

        Replays what one full-batch step draws from the reproducible source:
        one noise vector at the plan's scale, divided by ``q * N~`` and
        scaled by ``-lr`` (through the public projection, if any).
        """
        reproducible = dataclasses.replace(self.config, reproducible_noise=True)
        source = participation_noise(reproducible, round=round, client=AUDITED_CLIENT)
        width = self.clean.numel() if self.projection is None else self.projection.shape[1]
        step = self.plan.step
        z = mechanism_noise(
            torch.Size([width]),
            mechanism=self.config.dp,
            scale=step.noise_scale,
            noise=source,  # type: ignore[arg-type]
        )
        assert z is not None
        z = z / (step.sample_rate * sum(self.histogram))
        if self.projection is not None:
            z = self.projection.double() @ z
        return -self.config.lr * z.double()

    def statistic(self, residual: torch.Tensor) -> float:
        """The log-likelihood ratio "canary in" vs "out" of a residual (up to a positive factor).

        Centred: the two hypotheses give mirror-image distributions around
        0 (the noise is symmetric), so 0 is the natural threshold.
        """
        if mechanism_of(self.config).gaussian_tradeoff:
            norm = self.contribution.norm()
            return float(residual @ self.contribution / norm - norm / 2)
        z, c = self.to_subspace(residual), self.contribution_sub
        return float((z.abs() - (z - c).abs()).sum())


@dataclass
class AuditResult:
    report: dict[str, Any]

    @property
    def passed(self) -> bool:
        return bool(self.report["passed"])


def run_audit(
    setup: AuditSetup,
    *,
    trials: int,
    seed: int,
    confidence: float = 0.95,
    calibration_share: float = 0.25,
    progress: Callable[[int, int], None] | None = None,
) -> AuditResult:
    """Play ``trials`` rounds of the game (half with the canary); report the bounds."""
    if trials < 40:
        raise ValueError(f"an audit needs at least 40 trials, got {trials}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    game = AuditGame(setup)
    config = setup.config
    rng = numpy_generator(seed, "audit", "hypotheses")
    canary_in = rng.permutation(np.arange(trials) % 2 == 1)
    stats_by_attack = {a: np.empty(trials) for a in ATTACKS}
    regen_errors = []
    for t in range(trials):
        inn = bool(canary_in[t])
        released = game.release(canary=inn, round=t + 1)
        residual = released - game.clean
        regenerated = residual - game.regenerated_noise(t + 1)
        stats_by_attack["white-box"][t] = game.statistic(residual)
        stats_by_attack["regenerated-noise"][t] = game.statistic(regenerated)
        target = game.contribution if inn else torch.zeros_like(residual)
        # The miner's view: does the regenerated noise explain the update?
        regen_errors.append(float((regenerated - target).norm() / (game.clean + target).norm()))
        if progress is not None:
            progress(t + 1, trials)
    alpha = (1 - confidence) / len(ATTACKS)  # Bonferroni over the attacks
    calibration = int(calibration_share * trials)
    mechanism = mechanism_of(config)
    delta = mechanism.delta(config.delta)
    single_gaussian = mechanism.gaussian_tradeoff
    attacks = {}

    def model_free(counts: ErrorCounts) -> float:
        return epsilon_lower_bound(counts, delta=delta, alpha=alpha)

    def gdp(counts: ErrorCounts) -> float:
        return gdp_mu_lower_bound(counts, alpha=alpha)

    for name, values in stats_by_attack.items():
        counts = error_counts(values, canary_in, calibration=calibration, bound=model_free)
        entry: dict[str, Any] = {
            "model_free": {**dataclasses.asdict(counts), "epsilon_lower_bound": model_free(counts)}
        }
        if single_gaussian:
            # Any threshold estimates mu; the middle one (0, fixed before the
            # trials) estimates it best, and needs no calibration trials.
            counts = _counts_at(values[~canary_in], values[canary_in], 0.0)
            mu = gdp(counts)
            entry["gdp"] = {
                **dataclasses.asdict(counts),
                "mu_lower_bound": mu,
                "epsilon_lower_bound": gdp_epsilon(mu, delta=delta),
            }
        attacks[name] = entry
    bound_name = "gdp" if single_gaussian else "model_free"
    lower = max(a[bound_name]["epsilon_lower_bound"] for a in attacks.values())
    plan = game.plan
    accountants = mechanism.accountants
    per_release = {
        a: history_epsilon(config.dp, [plan.step.release], delta=config.delta, accountant=a)
        for a in accountants
    }
    claim = per_release[plan.accountant]
    if single_gaussian:
        positives = int(canary_in.sum())
        perfect = ErrorCounts(0, trials - positives, 0, positives)
        ceiling = gdp_epsilon(gdp_mu_lower_bound(perfect, alpha=alpha), delta=delta)
    else:
        positives = int(canary_in[calibration:].sum())
        perfect = ErrorCounts(0, trials - calibration - positives, 0, positives)
        ceiling = epsilon_lower_bound(perfect, delta=delta, alpha=alpha)
    median_error = float(np.median(regen_errors))
    report = {
        "setting": {
            "mechanism": config.dp,
            "epsilon_budget": config.epsilon,
            "delta": delta,
            "participations": dp_config(config).max_participations,
            "accountant": plan.accountant,
            "clip": config.clip,
            "noise_multiplier_or_eps0": plan.step.noise_multiplier_or_eps0,
            "records": len(setup.y),
            "model": config.model,
            "subspace": config.dp_subspace,
        },
        "noise": "reproducible (public)" if config.reproducible_noise else "secret",
        "fault": setup.fault,
        "adjacency": "add/remove one record",
        "claimed_epsilon_per_release": claim,
        "accountant_epsilon_per_release": per_release,
        "trials": trials,
        "calibration_trials": calibration,
        "confidence": confidence,
        "bound": bound_name,
        "attacks": attacks,
        "empirical_epsilon_lower_bound": lower,
        "ceiling": ceiling,
        "lower_bound_over_claim": lower / claim if claim > 0 else math.inf,
        "miner_view": {
            "regenerated_noise_median_relative_error": median_error,
            "noise_regenerated": median_error < REGENERATED_TOLERANCE,
        },
        "passed": lower <= claim,
    }
    return AuditResult(report)
