"""Local differential privacy for one client: mechanisms, secret noise, accounting.

Implements the client side of the privacy design (docs/PRIVACY.md). Privacy
is *record-level* and *per client* under **add/remove-one** adjacency: two
local datasets are neighbours when one equals the other plus or minus a
single record. The guarantee covers everything a client releases:

1. **Registration**: a noisy label histogram (one bin per class and one for
   records whose label is not a valid class). Adding or removing a record
   changes one bin by one, so the histogram has L1 and L2 sensitivity 1.
   Everything the chain holds about a client's data (record count, classes
   present, quality, hence its self-assessment and FedAvg weight) is derived
   from this release; nothing about the exact record count ``N`` is
   published.
2. **Updates**: DP-SGD (Abadi et al., "Deep Learning with Differential
   Privacy", CCS 2016) on the client's data. Each step Poisson-samples the
   records at rate ``q`` (secretly), clips each per-sample gradient to norm
   ``C``, sums, adds noise, and divides by ``q * N~``, where ``N~`` is the
   record count the registration released (public). Under add/remove-one the
   clipped sum changes by at most ``C``, so ``C`` is the sensitivity, and
   the divisor, ``q`` and the number of steps are all public: ``q`` and the
   steps follow from the run configuration alone (:func:`public_schedule`),
   never from ``N``.

Two mechanisms:

``gaussian``
    L2 clipping, Gaussian noise of standard deviation ``sigma * C``, a
    Gaussian histogram. Accounted as a composition of Poisson-subsampled
    Gaussian mechanisms with Opacus's accountants: Renyi DP (Mironov, Talwar,
    Zhang 2019) or privacy loss random variables (PRV; Gopi, Lee, Wutschitz,
    "Numerical Composition of Differential Privacy", NeurIPS 2021). Both give
    valid upper bounds; calibration uses the tighter one (``accountant =
    "auto"``) and both are reported.
``laplace``
    L1 clipping, Laplace noise of scale ``C / eps0`` per coordinate and a
    Laplace histogram: pure epsilon-DP. Poisson subsampling amplifies a step
    to ``ln(1 + q (exp(eps0) - 1))`` (Balle, Barthe, Gaboardi, NeurIPS 2018,
    Theorem 8) and releases compose by basic composition.

Each mechanism is a :class:`NoiseMechanism` registered in
``MECHANISM_REGISTRY`` under its ``--dp`` name (``none`` is the one that
clips, draws and spends nothing); it holds what differs between them: the
calibration, the accounting, the noise draw, the clipping norm, whether a
delta applies. Callers ask ``mechanism_of(config)`` rather than compare names.

The budget ``epsilon`` in :class:`DPConfig` is the total over the whole run,
the registration included: the histogram takes ``registration_share`` of it
and :func:`plan_privacy` calibrates the training noise so that registration
plus ``max_participations`` participations spend it exactly.

Randomness. The noise (and the Poisson sampling mask, which the subsampling
amplification needs secret) comes from a :class:`NoiseSource`. The default,
:class:`SecretNoise`, reads the operating system's CSPRNG, fresh for every
draw: no other node can regenerate it from the run seed or the chain.
:class:`SeededNoise` is the reproducible alternative for tests and
equivalence checks only (``--reproducible-noise``). This is the one
sanctioned exception to the rule that every draw is seeded.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar, Literal, Protocol, TypeVar

import numpy as np
import torch
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as privacy_analysis

from fl.registry import Registry

Mechanism = str  # a name registered in MECHANISM_REGISTRY ("none", "gaussian", "laplace")
Norm = Literal["l1", "l2"]
# "auto": calibrate with each valid accountant and keep the one that needs
# the least noise for the budget.
ACCOUNTANTS: tuple[str, ...] = ("auto", "rdp", "prv")
GAUSSIAN_ACCOUNTANTS: tuple[str, ...] = ("rdp", "prv")

# Relative slack when comparing spent epsilon with the budget: the spend after
# exactly ``max_participations`` participations may land a few ulps above the
# target; that must still count as "fits".
BUDGET_RTOL = 1e-9

# Calibration spends a budget within [epsilon - tol, epsilon] (Opacus's default).
DEFAULT_EPSILON_TOLERANCE = 0.01
# PRV: the width of the accountant's own error band (its upper end is used).
PRV_EPS_ERROR = 0.01
# Share of the budget spent on the registration histogram by default.
DEFAULT_REGISTRATION_SHARE = 0.05
# A class counts as present when its noisy count is at least this many
# standard deviations of the histogram noise (and at least one record).
CLASS_PRESENT_SDS = 2.0

Grads = TypeVar("Grads", torch.Tensor, Sequence[torch.Tensor])


class BudgetExhausted(Exception):
    """One more release would spend more than the client's privacy budget."""


# Noise sources ------------------------------------------------------------------


class NoiseSource(Protocol):
    """Where a mechanism's random draws come from (float64 tensors)."""

    secret: bool

    def uniform(self, n: int) -> torch.Tensor:
        """``n`` draws uniform on [0, 1)."""
        ...

    def gaussian(self, shape: torch.Size | tuple[int, ...], *, scale: float) -> torch.Tensor:
        """N(0, scale^2) draws."""
        ...

    def laplace(self, shape: torch.Size | tuple[int, ...], *, scale: float) -> torch.Tensor:
        """Laplace(0, scale) draws."""
        ...


def _exponentials_from(u: torch.Tensor) -> torch.Tensor:
    # -log1p(-U) is Exp(1) and finite for every U in [0, 1), unlike the
    # inverse CDF at U == 0.
    return -torch.log1p(-u)


class SecretNoise:
    """Draws from the operating system's CSPRNG (``os.urandom``, i.e. getrandom(2)).

    Each call reads fresh kernel randomness (ChaCha20 on Linux), so a draw
    can be neither predicted nor regenerated by anyone else, and no state
    lives in this process that a later output could reveal. A uniform is a
    53-bit integer over 2^53; normals come from Box-Muller in float64.

    Gaussian noise is the sum of four independent N(0, scale^2) draws, halved
    (which is again N(0, scale^2)): Opacus's ``secure_mode`` does the same,
    after Holohan and Braghin, "Secure Random Sampling in Differential
    Privacy" (ESORICS 2021), against floating-point attacks on the low bits
    of a single textbook sample (Mironov, CCS 2012).
    """

    secret = True

    def uniform(self, n: int) -> torch.Tensor:
        raw = np.frombuffer(os.urandom(8 * n), dtype=np.uint64) >> np.uint64(11)
        return torch.from_numpy(raw.astype(np.float64) * 2.0**-53)

    def _standard_normal(self, n: int) -> torch.Tensor:
        pairs = (n + 1) // 2
        u = self.uniform(2 * pairs).view(2, pairs)
        radius = torch.sqrt(-2.0 * torch.log1p(-u[0]))  # 1 - U in (0, 1]
        angle = 2.0 * math.pi * u[1]
        return torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)])[:n]

    def gaussian(self, shape: torch.Size | tuple[int, ...], *, scale: float) -> torch.Tensor:
        n = math.prod(shape)
        total = self._standard_normal(4 * n).view(4, n).sum(dim=0) / 2.0
        return scale * total.view(tuple(shape))

    def laplace(self, shape: torch.Size | tuple[int, ...], *, scale: float) -> torch.Tensor:
        n = math.prod(shape)
        e = _exponentials_from(self.uniform(2 * n)).view(2, n)
        return scale * (e[0] - e[1]).view(tuple(shape))


class SeededNoise:
    """Reproducible draws from a seeded ``torch.Generator``: tests and equivalence checks only.

    Anyone who knows the seed regenerates the noise and subtracts it, so a
    release made with this source carries **no** privacy.
    """

    secret = False

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator

    def uniform(self, n: int) -> torch.Tensor:
        return torch.rand(n, generator=self.generator, dtype=torch.float64)

    def gaussian(self, shape: torch.Size | tuple[int, ...], *, scale: float) -> torch.Tensor:
        return scale * torch.randn(tuple(shape), generator=self.generator, dtype=torch.float64)

    def laplace(self, shape: torch.Size | tuple[int, ...], *, scale: float) -> torch.Tensor:
        e = _exponentials_from(self.uniform(2 * math.prod(shape))).view(2, -1)
        return scale * (e[0] - e[1]).view(tuple(shape))


# Configuration and plans --------------------------------------------------------


@dataclass(frozen=True)
class DPConfig:
    """A client's local-DP settings.

    ``epsilon`` is the total budget over the whole run, registration included
    (use ``math.inf`` with ``mechanism="none"``); ``delta`` is used by
    ``gaussian`` only; ``clip`` is the per-sample norm bound (L2 for
    gaussian, L1 for laplace); ``max_participations`` is how many rounds the
    client may take part in; ``registration_share`` in (0, 1) is the part of
    the budget the registration histogram gets; ``accountant`` is ``rdp``,
    ``prv`` or ``auto`` (the tighter of the two).
    """

    mechanism: Mechanism
    epsilon: float
    delta: float = 1e-5
    clip: float = 1.0
    max_participations: int = 1
    registration_share: float = DEFAULT_REGISTRATION_SHARE
    accountant: str = "auto"

    def __post_init__(self) -> None:
        mechanism = mechanism_of(self.mechanism)
        # `not x > 0` also rejects NaN.
        if not self.epsilon > 0:
            raise ValueError(f"epsilon must be > 0, got {self.epsilon}")
        if not mechanism.is_none and math.isinf(self.epsilon):
            raise ValueError(f"epsilon must be finite for mechanism {self.mechanism!r}")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")
        if not (self.clip > 0 and math.isfinite(self.clip)):
            raise ValueError(f"clip must be a finite number > 0, got {self.clip}")
        if isinstance(self.max_participations, bool) or not isinstance(
            self.max_participations, int
        ):
            raise ValueError(f"max_participations must be an int, got {self.max_participations!r}")
        if self.max_participations < 1:
            raise ValueError(f"max_participations must be >= 1, got {self.max_participations}")
        if not 0 < self.registration_share < 1:
            raise ValueError(f"registration_share must be in (0, 1), got {self.registration_share}")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {self.accountant!r}")

    @property
    def clip_norm(self) -> Norm:
        """The clipping norm that matches the mechanism's sensitivity."""
        return mechanism_of(self).clip_norm


@dataclass(frozen=True)
class StepPlan:
    """How one participation trains: Poisson rate, number of steps, noise.

    ``noise_multiplier_or_eps0`` is the Gaussian noise multiplier ``sigma``
    (gaussian), the per-step epsilon ``eps0`` (laplace) or 0.0 (none);
    ``noise_scale`` is what :func:`noisy_sum` takes: ``sigma * clip``
    (Gaussian standard deviation) or ``clip / eps0`` (Laplace scale ``b``).
    """

    sample_rate: float
    steps: int
    noise_multiplier_or_eps0: float
    noise_scale: float

    @property
    def release(self) -> Release:
        return Release(self.noise_multiplier_or_eps0, self.sample_rate, self.steps)


@dataclass(frozen=True)
class Release:
    """``steps`` identical steps of one mechanism: noise multiplier (gaussian)
    or per-step epsilon (laplace), at Poisson rate ``sample_rate``; the unit
    of privacy accounting, like an entry of Opacus's accountant history."""

    noise: float
    sample_rate: float
    steps: int


@dataclass(frozen=True)
class PrivacyPlan:
    """Everything a client releases and what it costs, fixed by the run configuration.

    ``registration`` is the histogram release (one step at rate 1: noise
    multiplier ``sigma_h``, sensitivity 1, or per-release epsilon ``eps_h``);
    ``step`` is one participation; ``accountant`` is the accountant the noise
    was calibrated with and the budget is checked against (``rdp`` or
    ``prv`` for gaussian, ``basic`` for laplace, ``none``).
    """

    mechanism: Mechanism
    accountant: str
    registration: Release
    step: StepPlan

    @property
    def histogram_scale(self) -> float:
        """Standard deviation (gaussian) or scale (laplace) of the histogram noise."""
        return mechanism_of(self).histogram_scale(self.registration)

    @property
    def histogram_sd(self) -> float:
        """Standard deviation of the noise on each histogram bin."""
        return mechanism_of(self).histogram_sd(self.histogram_scale)

    @property
    def class_threshold(self) -> float:
        """Noisy count from which a class counts as present."""
        return max(1.0, CLASS_PRESENT_SDS * self.histogram_sd)


def _check_rate_and_steps(sample_rate: float, steps: int) -> None:
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")


# Accounting -------------------------------------------------------------------------


def append_release(history: Sequence[Release], release: Release) -> list[Release]:
    """``history`` plus ``release``, merged into the last entry when the steps are alike.

    Merging makes the spend after ``max_participations`` participations the
    very computation the calibration did (both accountants are exact in the
    number of identical steps).
    """
    _check_rate_and_steps(release.sample_rate, release.steps)
    out = list(history)
    if out and (out[-1].noise, out[-1].sample_rate) == (release.noise, release.sample_rate):
        last = out.pop()
        release = Release(last.noise, last.sample_rate, last.steps + release.steps)
    out.append(release)
    return out


def merged(releases: Iterable[Release]) -> list[Release]:
    """``releases`` as a history, each run of alike steps merged (:func:`append_release`)."""
    history: list[Release] = []
    for release in releases:
        history = append_release(history, release)
    return history


@functools.lru_cache(maxsize=1024)
def _one_step_rdp(sample_rate: float, noise_multiplier: float) -> np.ndarray:
    return privacy_analysis.compute_rdp(
        q=sample_rate,
        noise_multiplier=noise_multiplier,
        steps=1,
        orders=RDPAccountant.DEFAULT_ALPHAS,
    )


@contextlib.contextmanager
def _quiet_opacus() -> Iterator[None]:
    # Opacus warns when the best RDP order is an end of its range (the bound
    # is still valid, only not the tightest), and its PRV code takes
    # log(1 - q) = -inf at q = 1 (the result is still right).
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.filterwarnings("ignore", message="Optimal order is the")
        yield


def _rdp_epsilon(history: tuple[Release, ...], delta: float) -> float:
    # What RDPAccountant.get_epsilon computes, with the per-step RDP curve
    # cached: Opacus's compute_rdp is exactly steps * (one step).
    rdp = sum(_one_step_rdp(r.sample_rate, r.noise) * r.steps for r in history)
    with _quiet_opacus():
        eps, _ = privacy_analysis.get_privacy_spent(
            orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta
        )
    return float(eps)


@functools.lru_cache(maxsize=4096)
def _prv_epsilon(history: tuple[Release, ...], delta: float) -> float:
    accountant = PRVAccountant()
    accountant.history = [(r.noise, r.sample_rate, r.steps) for r in history]
    with _quiet_opacus():
        return float(accountant.get_epsilon(delta, eps_error=PRV_EPS_ERROR))


def gaussian_epsilon(history: Sequence[Release], *, delta: float, accountant: str) -> float:
    """Epsilon at ``delta`` of a composition of Poisson-subsampled Gaussian releases."""
    if not history:
        return 0.0
    key = tuple(history)
    if accountant == "rdp":
        return _rdp_epsilon(key, delta)
    if accountant == "prv":
        return _prv_epsilon(key, delta)
    raise ValueError(f"unknown Gaussian accountant {accountant!r}")


def amplified_epsilon(*, eps0: float, sample_rate: float) -> float:
    """Epsilon of one Poisson-subsampled ``eps0``-DP step (add/remove-one)."""
    if sample_rate == 1:
        return eps0
    # log1p/expm1 keep precision when eps0 and q are small.
    return math.log1p(sample_rate * math.expm1(eps0))


def laplace_epsilon(history: Sequence[Release]) -> float:
    """Basic composition of (amplified) pure-DP releases."""
    return math.fsum(
        r.steps * amplified_epsilon(eps0=r.noise, sample_rate=r.sample_rate) for r in history
    )


def history_epsilon(
    mechanism: Mechanism, history: Sequence[Release], *, delta: float, accountant: str
) -> float:
    """Epsilon of ``history``, releases of the mechanism named ``mechanism``."""
    if not history:
        return 0.0
    return mechanism_of(mechanism).epsilon(history, delta=delta, accountant=accountant)


def composed_epsilon(
    releases: Sequence[tuple[Mechanism, Release]], *, delta: float, accountant: str
) -> float:
    """Epsilon of releases of possibly different mechanisms on the same data.

    Each mechanism's releases compose with its own accounting (Gaussian ones
    at ``delta`` with ``accountant``, Laplace ones by basic composition); the
    groups then add up by basic composition. This is how a client's spend
    composes across runs on the same data.
    """
    return sum(
        history_epsilon(
            name,
            merged(r for kind, r in releases if kind == name),
            delta=delta,
            accountant=accountant,
        )
        for name in MECHANISM_REGISTRY.names()
        if not mechanism_of(name).is_none
    )


# Calibration --------------------------------------------------------------------------


def _smallest_noise(spend: Callable[[float], float], *, target: float, tolerance: float) -> float:
    """A noise level whose ``spend`` is within [target - tolerance, target].

    ``spend`` falls as the noise grows and is close to a straight line in
    log-log coordinates, so after bracketing the target this interpolates
    there (regula falsi, each step kept inside the bracket), which takes a
    handful of evaluations where bisection takes twenty: each one is a
    numerical accountant run, up to half a second for PRV. The upper end of
    the bracket, always within budget, is returned.
    """
    high, eps_high = 1.0, spend(1.0)
    low, eps_low = high, eps_high
    while eps_high > target:
        low, eps_low = high, eps_high
        high *= 2
        if high > 1e7:
            raise ValueError(f"no noise reaches epsilon {target}")
        eps_high = spend(high)
    while eps_low <= target:
        high, eps_high = low, eps_low
        if target - eps_high <= tolerance:
            return high
        low /= 2
        eps_low = spend(low)
    while target - eps_high > tolerance:
        if eps_high > 0:
            fraction = (math.log(eps_low) - math.log(target)) / (
                math.log(eps_low) - math.log(eps_high)
            )
        else:
            fraction = 0.5
        fraction = min(0.95, max(0.05, fraction))
        mid = math.exp(math.log(low) + fraction * (math.log(high) - math.log(low)))
        eps = spend(mid)
        if eps > target:
            low, eps_low = mid, eps
        else:
            high, eps_high = mid, eps
    return high


def calibrate_gaussian(
    *,
    epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
    prefix: tuple[Release, ...] = (),
    epsilon_tolerance: float = DEFAULT_EPSILON_TOLERANCE,
) -> float:
    """Noise multiplier ``sigma`` so that ``prefix`` plus ``steps`` subsampled Gaussian
    steps spend at most ``epsilon`` (and at least ``epsilon - tolerance``) at ``delta``.

    Cached: every round, and every node, asks the same question.
    """
    _check_rate_and_steps(sample_rate, steps)
    return _cached_gaussian(
        float(epsilon),
        float(delta),
        float(sample_rate),
        int(steps),
        accountant,
        tuple(prefix),
        float(epsilon_tolerance),
    )


@functools.lru_cache(maxsize=1024)
def _cached_gaussian(
    epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str,
    prefix: tuple[Release, ...],
    epsilon_tolerance: float,
) -> float:
    def spend(sigma: float) -> float:
        history = append_release(prefix, Release(sigma, sample_rate, steps))
        return gaussian_epsilon(history, delta=delta, accountant=accountant)

    return _smallest_noise(spend, target=epsilon, tolerance=epsilon_tolerance)


def calibrate_laplace(*, epsilon: float, sample_rate: float, steps: int) -> float:
    """Per-step epsilon ``eps0`` so that ``steps`` subsampled steps spend ``epsilon``.

    Solves ``steps * ln(1 + q * (exp(eps0) - 1)) = epsilon``, i.e.
    ``eps0 = ln(1 + (exp(epsilon / steps) - 1) / q)``. With ``q == 1`` there is
    no amplification and the answer is exactly ``epsilon / steps``.
    """
    _check_rate_and_steps(sample_rate, steps)
    per_step = epsilon / steps
    if sample_rate == 1:
        return per_step
    return math.log1p(math.expm1(per_step) / sample_rate)


def local_steps(*, n_samples: int, batch_size: int, local_epochs: float) -> int:
    """Steps in ``local_epochs`` epochs of ``ceil(n_samples / batch_size)`` steps (at least 1)."""
    return max(1, round(local_epochs * -(-n_samples // batch_size)))


def public_schedule(
    *, expected_records: int, batch_size: int, local_epochs: float
) -> tuple[float, int]:
    """(Poisson rate ``q``, steps per participation) from public numbers only.

    ``expected_records`` is a public figure (the run's equal share of the
    training set), never a client's own count: ``q = min(1, B / n)`` and
    ``local_epochs`` expected epochs of ``ceil(n / B)`` steps. Every client
    of a run shares the schedule, so it reveals nothing about any of them.
    """
    if expected_records < 1 or batch_size < 1 or not local_epochs > 0:
        raise ValueError(
            "expected_records and batch_size must be >= 1 and local_epochs > 0, got "
            f"{expected_records}, {batch_size}, {local_epochs}"
        )
    sample_rate = min(1.0, batch_size / expected_records)
    steps = local_steps(
        n_samples=expected_records, batch_size=batch_size, local_epochs=local_epochs
    )
    return sample_rate, steps


def plan_privacy(
    config: DPConfig,
    *,
    sample_rate: float,
    steps: int,
    epsilon_tolerance: float = DEFAULT_EPSILON_TOLERANCE,
) -> PrivacyPlan:
    """Calibrate the registration histogram and the training noise for ``config``.

    Gaussian: the histogram's noise multiplier is ``sigma_1 / sqrt(share)``,
    where ``sigma_1`` would spend the whole budget in one Gaussian release;
    for a Gaussian composition (zero-concentrated DP, ``rho = 1 / (2 sigma^2)``
    per release) that gives the histogram ``share`` of the budget's ``rho``.
    The training noise is then the smallest that keeps registration plus
    ``max_participations`` participations within ``epsilon``, under each
    accountant ``config.accountant`` allows; the smaller noise wins.
    Laplace: the histogram spends ``share * epsilon`` (scale ``1 / eps_h``),
    the participations the rest, by basic composition.
    """
    _check_rate_and_steps(sample_rate, steps)
    return mechanism_of(config).calibrate(
        config, sample_rate=sample_rate, steps=steps, epsilon_tolerance=epsilon_tolerance
    )


# Mechanisms -------------------------------------------------------------------------


# A total budget below this is a "low budget" for the tuned options.
LOW_BUDGET = 5.0


class NoiseMechanism:
    """What differs between local-DP mechanisms; one registered subclass per ``--dp`` name.

    Class attributes state its kind: ``is_none`` (no clipping, no noise, no
    spend), ``uses_delta`` (approximate DP: its epsilon holds at a delta),
    ``clip_norm`` (the norm of its sensitivity, which per-sample gradients
    are clipped in), ``accountants`` (those that can read a history of its
    releases) and ``gaussian_tradeoff`` (one full-batch release is exactly a
    Gaussian mechanism, so an audit may bound ``mu``-GDP). Methods calibrate
    a plan, account a history, draw noise and describe the histogram noise.
    """

    name: ClassVar[str]
    is_none: ClassVar[bool] = False
    uses_delta: ClassVar[bool] = False
    clip_norm: ClassVar[Norm] = "l2"
    accountants: ClassVar[tuple[str, ...]] = ()
    gaussian_tradeoff: ClassVar[bool] = False
    # The run options this mechanism trains best with (chosen on 100-round
    # MNIST runs, docs/RESULTS.md); a run uses them for every one the user
    # leaves unset (``fl.config.TUNED``).
    tuned: ClassVar[Mapping[str, Any]] = MappingProxyType({})
    # What changes in them for a total budget below LOW_BUDGET.
    tuned_low_budget: ClassVar[Mapping[str, Any]] = MappingProxyType({})

    def tuned_options(self, epsilon: float) -> dict[str, Any]:
        """The tuned run options at total budget ``epsilon``."""
        if epsilon < LOW_BUDGET:
            return {**self.tuned, **self.tuned_low_budget}
        return dict(self.tuned)

    def delta(self, delta: float) -> float:
        """The delta its guarantee holds at, given the configured one (0 for pure DP)."""
        return delta if self.uses_delta else 0.0

    def calibrate(
        self, config: DPConfig, *, sample_rate: float, steps: int, epsilon_tolerance: float
    ) -> PrivacyPlan:
        """The noise of the registration and of each step, so that registration plus
        ``config.max_participations`` participations spend ``config.epsilon``."""
        raise NotImplementedError

    def epsilon(self, history: Sequence[Release], *, delta: float, accountant: str) -> float:
        """Epsilon spent by a (non-empty) history of its releases."""
        raise NotImplementedError

    def replace_one_epsilon(self, plan: PrivacyPlan, *, participations: int, delta: float) -> float:
        """The total epsilon of ``plan`` read under replace-one adjacency (see
        ``fl.rounds.replace_one_epsilon``)."""
        raise NotImplementedError

    def draw(
        self, shape: torch.Size | tuple[int, ...], *, scale: float, noise: NoiseSource
    ) -> torch.Tensor | None:
        """Noise of ``shape`` at ``scale`` from ``noise`` (None: it adds nothing)."""
        raise NotImplementedError

    def histogram_scale(self, registration: Release) -> float:
        """The scale its histogram noise is drawn at (what :meth:`draw` takes)."""
        raise NotImplementedError

    def histogram_sd(self, scale: float) -> float:
        """The standard deviation of noise drawn at ``scale``."""
        return scale


MECHANISM_REGISTRY: Registry[type[NoiseMechanism]] = Registry("DP mechanism")


def mechanism_of(of: Any) -> NoiseMechanism:
    """The registered mechanism ``of`` names: a name, or anything with a
    ``mechanism`` (DPConfig, PrivacyPlan) or ``dp`` (RunConfig) attribute."""
    if isinstance(of, str):
        name = of
    elif hasattr(of, "mechanism"):
        name = of.mechanism
    else:
        name = of.dp
    return MECHANISM_REGISTRY.get(name)()


@MECHANISM_REGISTRY.register("none")
class NoNoise(NoiseMechanism):
    """No differential privacy: no clipping, no noise, nothing spent."""

    name = "none"
    is_none = True
    # The paper's B = 10 and one local epoch, with twice its step and no
    # dropout (98% instead of 97.2% on non-IID data at 20 clients a round).
    tuned = MappingProxyType(
        {
            "batch_size": 10,
            "lr": 0.02,
            "momentum": 0.5,
            "dropout": False,
            "server_momentum": 0.0,
            "server_lr_decay": "none",
            "dp_subspace": 0,
        }
    )

    def calibrate(
        self, config: DPConfig, *, sample_rate: float, steps: int, epsilon_tolerance: float
    ) -> PrivacyPlan:
        return PrivacyPlan(
            self.name, "none", Release(0.0, 1.0, 1), StepPlan(sample_rate, steps, 0.0, 0.0)
        )

    def epsilon(self, history: Sequence[Release], *, delta: float, accountant: str) -> float:
        return 0.0

    def replace_one_epsilon(self, plan: PrivacyPlan, *, participations: int, delta: float) -> float:
        return 0.0

    def draw(
        self, shape: torch.Size | tuple[int, ...], *, scale: float, noise: NoiseSource
    ) -> torch.Tensor | None:
        return None

    def histogram_scale(self, registration: Release) -> float:
        return 0.0


@MECHANISM_REGISTRY.register("gaussian")
class GaussianMechanism(NoiseMechanism):
    """L2 clipping, Gaussian noise, RDP or PRV accounting at a delta."""

    name = "gaussian"
    uses_delta = True
    clip_norm = "l2"
    accountants = GAUSSIAN_ACCOUNTANTS
    gaussian_tradeoff = True
    # Full-batch DP-SGD (one noisy step of every record per round) with
    # server momentum: for a fixed budget the least noise per unit of
    # progress, and no client drift on non-IID data. No dropout: the noise
    # already regularises.
    tuned = MappingProxyType(
        {
            "batch_size": 600,
            "lr": 2.0,
            "momentum": 0.0,
            "dropout": False,
            "server_momentum": 0.9,
            "server_lr_decay": "none",
            "dp_subspace": 0,
        }
    )
    # Below epsilon 5 the noise multiplier is 4-8x that at 10: a quarter of
    # the client step, and a server step that decays on a cosine so that the
    # late rounds average the noise instead of drifting on it.
    tuned_low_budget = MappingProxyType({"lr": 0.5, "server_lr_decay": "cosine"})

    def calibrate(
        self, config: DPConfig, *, sample_rate: float, steps: int, epsilon_tolerance: float
    ) -> PrivacyPlan:
        total_steps = steps * config.max_participations
        candidates = []
        accountants = GAUSSIAN_ACCOUNTANTS if config.accountant == "auto" else (config.accountant,)
        for accountant in accountants:
            sigma_1 = calibrate_gaussian(
                epsilon=config.epsilon,
                delta=config.delta,
                sample_rate=1.0,
                steps=1,
                accountant=accountant,
                epsilon_tolerance=epsilon_tolerance,
            )
            registration = Release(sigma_1 / math.sqrt(config.registration_share), 1.0, 1)
            sigma = calibrate_gaussian(
                epsilon=config.epsilon,
                delta=config.delta,
                sample_rate=sample_rate,
                steps=total_steps,
                accountant=accountant,
                prefix=(registration,),
                epsilon_tolerance=epsilon_tolerance,
            )
            candidates.append((sigma, accountant, registration))
        sigma, accountant, registration = min(candidates)
        return PrivacyPlan(
            self.name,
            accountant,
            registration,
            StepPlan(sample_rate, steps, sigma, sigma * config.clip),
        )

    def epsilon(self, history: Sequence[Release], *, delta: float, accountant: str) -> float:
        return gaussian_epsilon(history, delta=delta, accountant=accountant)

    def replace_one_epsilon(self, plan: PrivacyPlan, *, participations: int, delta: float) -> float:
        # Every noise multiplier halves (the histogram's shrinks by sqrt 2);
        # exact at q = 1 only.
        if plan.step.sample_rate != 1:
            raise ValueError("replace-one accounting is implemented for full-batch steps (q = 1)")
        registration = Release(plan.registration.noise / math.sqrt(2), 1.0, 1)
        step = Release(plan.step.noise_multiplier_or_eps0 / 2, 1.0, plan.step.steps)
        history = merged([registration] + [step] * participations)
        return self.epsilon(history, delta=delta, accountant=plan.accountant)

    def draw(
        self, shape: torch.Size | tuple[int, ...], *, scale: float, noise: NoiseSource
    ) -> torch.Tensor | None:
        return noise.gaussian(shape, scale=scale)

    def histogram_scale(self, registration: Release) -> float:
        return registration.noise


@MECHANISM_REGISTRY.register("laplace")
class LaplaceMechanism(NoiseMechanism):
    """L1 clipping, Laplace noise, pure DP by basic composition."""

    name = "laplace"
    clip_norm = "l1"
    accountants = ("basic",)
    # As Gaussian's, with the noise added in a 128-dimensional random public
    # subspace (Laplace noise grows with the dimension it is added in) and a
    # larger step.
    tuned = MappingProxyType(
        {
            "batch_size": 600,
            "lr": 10.0,
            "momentum": 0.0,
            "dropout": False,
            "server_momentum": 0.9,
            "server_lr_decay": "none",
            "dp_subspace": 128,
        }
    )

    def calibrate(
        self, config: DPConfig, *, sample_rate: float, steps: int, epsilon_tolerance: float
    ) -> PrivacyPlan:
        total_steps = steps * config.max_participations
        eps_h = config.registration_share * config.epsilon
        eps0 = calibrate_laplace(
            epsilon=config.epsilon - eps_h, sample_rate=sample_rate, steps=total_steps
        )
        return PrivacyPlan(
            self.name,
            "basic",
            Release(eps_h, 1.0, 1),
            StepPlan(sample_rate, steps, eps0, config.clip / eps0),
        )

    def epsilon(self, history: Sequence[Release], *, delta: float, accountant: str) -> float:
        return laplace_epsilon(history)

    def replace_one_epsilon(self, plan: PrivacyPlan, *, participations: int, delta: float) -> float:
        # Pure DP: replacing a record is removing one and adding one.
        full = merged([plan.registration] + [plan.step.release] * participations)
        return 2 * self.epsilon(full, delta=delta, accountant="basic")

    def draw(
        self, shape: torch.Size | tuple[int, ...], *, scale: float, noise: NoiseSource
    ) -> torch.Tensor | None:
        return noise.laplace(shape, scale=scale)

    def histogram_scale(self, registration: Release) -> float:
        return 1.0 / registration.noise

    def histogram_sd(self, scale: float) -> float:
        return scale * math.sqrt(2.0)


MECHANISMS: tuple[Mechanism, ...] = MECHANISM_REGISTRY.names()


# Registration: the noisy label histogram -------------------------------------------


def label_histogram(labels: torch.Tensor, *, num_classes: int) -> torch.Tensor:
    """``[num_classes + 1]`` float64 counts: one per class, the last for invalid labels."""
    y = labels.reshape(-1).to(torch.int64)
    valid = (y >= 0) & (y < num_classes)
    counts = torch.bincount(y[valid], minlength=num_classes).to(torch.float64)
    return torch.cat([counts, torch.tensor([float((~valid).sum())], dtype=torch.float64)])


def release_histogram(
    labels: torch.Tensor, *, num_classes: int, plan: PrivacyPlan, noise: NoiseSource
) -> tuple[int, ...]:
    """The registration release: the label histogram plus noise, rounded to integers.

    Rounding is post-processing (it costs no privacy) and drops the low bits
    of the floating-point sum, where a single noisy double could betray the
    exact count.
    """
    counts = label_histogram(labels, num_classes=num_classes)
    drawn = mechanism_of(plan).draw(counts.shape, scale=plan.histogram_scale, noise=noise)
    if drawn is not None:
        counts = counts + drawn
    return tuple(int(v) for v in torch.round(counts).tolist())


def released_count(histogram: Sequence[int]) -> int:
    """The record count a histogram release implies (at least 1): the public divisor."""
    return max(1, int(sum(histogram)))


def fit_histogram(histogram: Sequence[int], *, cap: int) -> tuple[int, ...]:
    """The release fitted into what the chain admits: every bin in ``[-cap, cap]``, sum <= cap.

    ``cap`` is the run's public record cap (``fl.rounds.record_cap``). Bins
    below ``-cap`` are raised to it; if the total then exceeds the cap, the
    positive bins are scaled down together (rounding down), which keeps the
    classes' proportions, until it does not; a bin still above the cap is
    lowered to it. Deterministic post-processing of a DP release with a
    public bound, so it costs no privacy; a release within the bounds is
    returned unchanged.
    """
    if cap < 1:
        raise ValueError(f"cap must be >= 1, got {cap}")
    bins = [max(-cap, int(b)) for b in histogram]
    if sum(bins) > cap:
        positive = sum(b for b in bins if b > 0)
        room = cap - sum(b for b in bins if b < 0)  # what the positive bins may add up to
        bins = [b * room // positive if b > 0 else b for b in bins]
    return tuple(min(cap, b) for b in bins)


class PrivacyAccountant:
    """Privacy spent by one client: its registration and its participations.

    The history holds one :class:`Release` per run of identical steps, in
    the order they happened, like Opacus's accountant history; epsilon is
    computed with the plan's accountant (``spent_epsilon``), and with any
    other valid one on request (``spent_epsilon(accountant=...)``).
    """

    def __init__(self, config: DPConfig, plan: PrivacyPlan) -> None:
        self.config = config
        self.plan = plan
        self._history: list[Release] = []
        self._participations = 0
        self._registered = False

    @property
    def participations(self) -> int:
        return self._participations

    @property
    def registered(self) -> bool:
        return self._registered

    @property
    def history(self) -> list[Release]:
        return list(self._history)

    def _spent(self, history: Sequence[Release], accountant: str | None = None) -> float:
        return history_epsilon(
            self.config.mechanism,
            history,
            delta=self.config.delta,
            accountant=accountant or self.plan.accountant,
        )

    def spent_epsilon(self, *, accountant: str | None = None) -> float:
        """Epsilon spent so far (at ``config.delta`` for gaussian)."""
        return self._spent(self._history, accountant)

    def would_exceed(self) -> bool:
        """True when one more participation would overspend the budget."""
        if mechanism_of(self.config).is_none:
            return False
        after = self._spent(append_release(self._history, self.plan.step.release))
        return after > self.config.epsilon * (1 + BUDGET_RTOL)

    def record_registration(self) -> None:
        """Account for the registration histogram (once, before it is released)."""
        if self._registered:
            raise ValueError("the registration is already accounted")
        if not mechanism_of(self.config).is_none:
            self._history = append_release(self._history, self.plan.registration)
        self._registered = True

    def record_participation(self) -> None:
        """Account for one participation (call before training starts)."""
        if not mechanism_of(self.config).is_none:
            self._history = append_release(self._history, self.plan.step.release)
        self._participations += 1


# Clipping and noise ------------------------------------------------------------------


def _flatten(grads: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    if isinstance(grads, torch.Tensor):
        if grads.dim() != 2:
            raise ValueError(
                f"flat per-sample gradients must be [batch, params], got {tuple(grads.shape)}"
            )
        return grads
    return torch.cat([g.reshape(g.shape[0], -1) for g in grads], dim=1)


def _per_sample_norms(flat: torch.Tensor, norm: Norm) -> torch.Tensor:
    if norm == "l2":
        return torch.linalg.vector_norm(flat, ord=2, dim=1)
    if norm == "l1":
        return torch.linalg.vector_norm(flat, ord=1, dim=1)
    raise ValueError(f"unknown norm {norm!r}; expected 'l1' or 'l2'")


def clip_per_sample(grads: Grads, *, norm: Norm, bound: float) -> Grads:
    """Scale each sample's gradient by ``min(1, bound / ||g||)``.

    ``grads`` is either a flat ``[batch, params]`` tensor or a sequence of
    per-parameter tensors that share a leading batch dimension; the norm is
    taken over *all* of a sample's parameters together (that joint norm is
    what bounds the sensitivity), and the result has the same form as the
    input.
    """
    if not bound > 0:
        raise ValueError(f"clip bound must be > 0, got {bound}")
    norms = _per_sample_norms(_flatten(grads), norm)
    # Dividing by a zero norm would give inf * 0 = NaN; a zero gradient needs no
    # clipping, so its factor is 1.
    factors = torch.clamp(bound / norms.clamp_min(torch.finfo(norms.dtype).tiny), max=1.0)
    if isinstance(grads, torch.Tensor):
        return grads * factors.unsqueeze(1)
    return [g * factors.reshape(-1, *([1] * (g.dim() - 1))) for g in grads]


def mechanism_noise(
    shape: torch.Size, *, mechanism: Mechanism, scale: float, noise: NoiseSource
) -> torch.Tensor | None:
    """The mechanism's noise of ``shape`` (None for ``none``)."""
    return mechanism_of(mechanism).draw(shape, scale=scale, noise=noise)


def noisy_sum(clipped: Grads, *, mechanism: Mechanism, scale: float, noise: NoiseSource) -> Grads:
    """Sum clipped per-sample gradients over the batch and add noise per coordinate.

    ``scale`` is the Gaussian standard deviation (``sigma * clip``) or the
    Laplace scale (``clip / eps0``); ``none`` adds nothing. For a sequence of
    per-parameter tensors, noise is drawn parameter by parameter in sequence
    order. The batch may be empty (Poisson sampling can pick no record); the
    noise is still added, as the privacy analysis assumes.
    """
    if not scale >= 0:
        raise ValueError(f"noise scale must be >= 0, got {scale}")
    tensors = [clipped] if isinstance(clipped, torch.Tensor) else list(clipped)
    out = []
    for t in tensors:
        total = t.sum(dim=0)
        drawn = mechanism_noise(total.shape, mechanism=mechanism, scale=scale, noise=noise)
        out.append(total if drawn is None else total + drawn.to(total.dtype))
    return out[0] if isinstance(clipped, torch.Tensor) else out


def clipped_sum(per_sample: torch.Tensor, *, config: DPConfig) -> torch.Tensor:
    """The batch sum ``[params]`` of the clipped rows of ``per_sample`` ``[batch, params]``.

    Sums of disjoint chunks of a batch add up to the sum over the batch, so a
    caller can take per-sample gradients a chunk at a time; see
    :func:`noisy_average` for the rest of the step.
    """
    if not mechanism_of(config).is_none:
        per_sample = clip_per_sample(per_sample, norm=config.clip_norm, bound=config.clip)
    return per_sample.sum(dim=0)


def noisy_average(
    summed: torch.Tensor,
    *,
    config: DPConfig,
    plan: StepPlan,
    released_records: int,
    noise: NoiseSource,
) -> torch.Tensor:
    """Noise the clipped sum, then divide by the public ``q * N~``.

    ``released_records`` is ``N~``, the record count the client's
    registration released, never its exact count: the divisor must not
    depend on the data beyond what is already released (under add/remove-one
    the exact count differs between neighbours, and it would show in the
    scale of the update).
    """
    noisy = noisy_sum(
        summed.unsqueeze(0), mechanism=config.mechanism, scale=plan.noise_scale, noise=noise
    )
    return noisy / (plan.sample_rate * released_records)


def private_gradient(
    per_sample: torch.Tensor,
    *,
    config: DPConfig,
    plan: StepPlan,
    released_records: int,
    noise: NoiseSource,
) -> torch.Tensor:
    """One DP-SGD gradient from ``[batch, params]``: clip, sum, noise, divide by ``q * N~``.

    With ``mechanism="none"`` there is no clipping and no noise. Training
    calls the two halves, :func:`clipped_sum` (per chunk) and
    :func:`noisy_average`.
    """
    return noisy_average(
        clipped_sum(per_sample, config=config),
        config=config,
        plan=plan,
        released_records=released_records,
        noise=noise,
    )


def poisson_mask(n: int, *, sample_rate: float, noise: NoiseSource) -> torch.Tensor:
    """Indices of the records a step samples, each with probability ``sample_rate``.

    Drawn from the noise source: the amplification by subsampling holds
    only if nobody else knows which records were sampled. At rate 1 every
    record is taken and nothing is drawn.
    """
    if sample_rate >= 1:
        return torch.arange(n)
    return torch.nonzero(noise.uniform(n) < sample_rate).squeeze(1)
