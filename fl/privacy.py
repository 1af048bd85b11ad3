"""Local differential privacy for one client: mechanisms and budget accounting.

Implements the client side of DESIGN.md section 5. Privacy is *record-level*
and *per client*: the neighbouring relation is add/remove-one, i.e. two local
datasets are neighbours when one equals the other plus or minus a single
record. Each client runs DP-SGD on its own data (Abadi et al., "Deep Learning
with Differential Privacy", CCS 2016): per step, a Poisson-sampled batch
(every record included independently with probability ``q``), per-sample
gradients clipped to a norm bound ``C``, summed, noised, and divided by the
*expected* batch size ``q * N``. Under add/remove-one, the clipped sum changes
by at most ``C`` in the clipping norm, so ``C`` is the sensitivity.

Two mechanisms:

``gaussian``
    L2 clipping and Gaussian noise of standard deviation ``sigma * C``.
    Accounted with Renyi DP for the Poisson-subsampled Gaussian mechanism
    (Mironov, Talwar, Zhang, "Renyi Differential Privacy of the Sampled
    Gaussian Mechanism", 2019) through Opacus's ``RDPAccountant``; the noise
    multiplier ``sigma`` is found with Opacus's ``get_noise_multiplier``.
    Nothing about RDP is re-derived here.
``laplace``
    L1 clipping and Laplace noise of scale ``C / eps0`` per coordinate, which
    is ``eps0``-DP per step on the sampled batch. Poisson subsampling with
    rate ``q`` amplifies that to ``ln(1 + q * (exp(eps0) - 1))`` under
    add/remove-one (Li, Qardaji, Su, "On Sampling, Anonymization, and
    Differential Privacy", AsiaCCS 2012; Balle, Barthe, Gaboardi, "Privacy
    Amplification by Subsampling: Tight Analyses via Couplings and
    Divergences", NeurIPS 2018, Theorem 8), and steps compose by basic
    composition (the per-step epsilons add up).

The budget ``epsilon`` in :class:`DPConfig` is the total over the whole run;
:func:`plan_participation` calibrates the noise so that ``max_participations``
participations spend it exactly, and :class:`PrivacyAccountant` tracks what
has been spent so that the client can decline instead of overspending.

All randomness comes from a caller-supplied ``torch.Generator``
(DESIGN.md section 4).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import numpy as np
import torch
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as privacy_analysis
from opacus.accountants.utils import get_noise_multiplier

Mechanism = Literal["none", "gaussian", "laplace"]
Norm = Literal["l1", "l2"]
MECHANISMS: tuple[Mechanism, ...] = ("none", "gaussian", "laplace")

# Relative slack when comparing spent epsilon with the budget: the spend after
# exactly ``max_participations`` participations is computed by a different
# sequence of float operations than the calibration, so it may land a few ulps
# above the target; that must still count as "fits".
BUDGET_RTOL = 1e-9

# Opacus's default binary-search tolerance: the calibrated noise spends a
# budget within [epsilon - tol, epsilon].
DEFAULT_EPSILON_TOLERANCE = 0.01

Grads = TypeVar("Grads", torch.Tensor, Sequence[torch.Tensor])


@dataclass(frozen=True)
class DPConfig:
    """A client's local-DP settings.

    ``epsilon`` is the total budget over the whole run (use ``math.inf`` with
    ``mechanism="none"``); ``delta`` is used by ``gaussian`` only;
    ``clip`` is the per-sample norm bound (L2 for gaussian, L1 for laplace);
    ``max_participations`` is how many rounds the client may take part in,
    and the noise is calibrated so that this many participations spend
    exactly ``epsilon``.
    """

    mechanism: Mechanism
    epsilon: float
    delta: float = 1e-5
    clip: float = 1.0
    max_participations: int = 1

    def __post_init__(self) -> None:
        if self.mechanism not in MECHANISMS:
            raise ValueError(
                f"unknown DP mechanism {self.mechanism!r}; expected one of {MECHANISMS}"
            )
        # `not x > 0` also rejects NaN.
        if not self.epsilon > 0:
            raise ValueError(f"epsilon must be > 0, got {self.epsilon}")
        if self.mechanism != "none" and math.isinf(self.epsilon):
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

    @property
    def clip_norm(self) -> Norm:
        """The clipping norm that matches the mechanism's sensitivity."""
        return "l1" if self.mechanism == "laplace" else "l2"


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


def _check_rate_and_steps(sample_rate: float, steps: int) -> None:
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")


def calibrate_gaussian(
    *,
    epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    epsilon_tolerance: float = DEFAULT_EPSILON_TOLERANCE,
) -> float:
    """Noise multiplier ``sigma`` for ``steps`` Poisson-subsampled Gaussian steps.

    Delegates to Opacus (RDP accountant, default orders). The result spends at
    most ``epsilon`` (and at least ``epsilon - epsilon_tolerance``) at
    ``delta`` under add/remove-one neighbours. Cached, because the binary
    search costs about a second and every round asks the same question.
    """
    _check_rate_and_steps(sample_rate, steps)
    return _cached_noise_multiplier(
        float(epsilon), float(delta), float(sample_rate), int(steps), float(epsilon_tolerance)
    )


# Positional and normalised arguments, so that equal questions share one entry.
@functools.lru_cache(maxsize=1024)
def _cached_noise_multiplier(
    epsilon: float, delta: float, sample_rate: float, steps: int, epsilon_tolerance: float
) -> float:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(
            get_noise_multiplier(
                target_epsilon=epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant="rdp",
                epsilon_tolerance=epsilon_tolerance,
            )
        )


@functools.lru_cache(maxsize=1024)
def _one_step_rdp(sample_rate: float, noise_multiplier: float) -> np.ndarray:
    return privacy_analysis.compute_rdp(
        q=sample_rate,
        noise_multiplier=noise_multiplier,
        steps=1,
        orders=RDPAccountant.DEFAULT_ALPHAS,
    )


def amplified_epsilon(*, eps0: float, sample_rate: float) -> float:
    """Epsilon of one Poisson-subsampled ``eps0``-DP step (add/remove-one)."""
    if sample_rate == 1:
        return eps0
    # log1p/expm1 keep precision when eps0 and q are small.
    return math.log1p(sample_rate * math.expm1(eps0))


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


def laplace_noise(
    shape: torch.Size | tuple[int, ...], *, scale: float, generator: torch.Generator
) -> torch.Tensor:
    """Laplace(0, scale) draws from ``generator`` only (float64).

    ``torch.distributions.Laplace`` samples from the global RNG, so the draw is
    built here as the difference of two Exp(1) variables, each ``-log1p(-U)``
    with ``U`` uniform on [0, 1): that is finite for every ``U`` torch can
    return, unlike the inverse CDF at ``U == 0``.
    """
    u = torch.rand((2, *shape), generator=generator, dtype=torch.float64)
    exponentials = -torch.log1p(-u)
    return scale * (exponentials[0] - exponentials[1])


def gaussian_noise(
    shape: torch.Size | tuple[int, ...], *, scale: float, generator: torch.Generator
) -> torch.Tensor:
    """N(0, scale^2) draws from ``generator`` only (float64)."""
    return scale * torch.randn(tuple(shape), generator=generator, dtype=torch.float64)


def _noise(
    shape: torch.Size, *, mechanism: Mechanism, scale: float, generator: torch.Generator
) -> torch.Tensor | None:
    if mechanism == "none":
        return None
    if mechanism == "gaussian":
        return gaussian_noise(shape, scale=scale, generator=generator)
    if mechanism == "laplace":
        return laplace_noise(shape, scale=scale, generator=generator)
    raise ValueError(f"unknown DP mechanism {mechanism!r}; expected one of {MECHANISMS}")


def noisy_sum(
    clipped: Grads, *, mechanism: Mechanism, scale: float, generator: torch.Generator
) -> Grads:
    """Sum clipped per-sample gradients over the batch and add noise per coordinate.

    ``scale`` is the Gaussian standard deviation (``sigma * clip``) or the
    Laplace scale (``clip / eps0``); ``none`` adds nothing. For a sequence of
    per-parameter tensors, noise is drawn parameter by parameter in sequence
    order, so the same generator state always gives the same noise. The
    batch may be empty (Poisson sampling can pick no record); the noise is
    still added, as the privacy analysis assumes.
    """
    if not scale >= 0:
        raise ValueError(f"noise scale must be >= 0, got {scale}")
    tensors = [clipped] if isinstance(clipped, torch.Tensor) else list(clipped)
    out = []
    for t in tensors:
        total = t.sum(dim=0)
        noise = _noise(total.shape, mechanism=mechanism, scale=scale, generator=generator)
        out.append(total if noise is None else total + noise.to(total.dtype))
    return out[0] if isinstance(clipped, torch.Tensor) else out


def private_gradient(
    per_sample: torch.Tensor,
    *,
    config: DPConfig,
    plan: StepPlan,
    n_samples: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """One DP-SGD gradient from ``[batch, params]``: clip, sum, noise, divide by ``q * N``.

    Dividing by the expected rather than the realised batch size keeps the
    sensitivity fixed (the realised size itself depends on the data). With
    ``mechanism="none"`` there is no clipping and no noise. Training calls
    the two halves, :func:`clipped_sum` (per chunk) and :func:`noisy_average`.
    """
    return noisy_average(
        clipped_sum(per_sample, config=config),
        config=config,
        plan=plan,
        n_samples=n_samples,
        generator=generator,
    )


def clipped_sum(per_sample: torch.Tensor, *, config: DPConfig) -> torch.Tensor:
    """The batch sum ``[params]`` of the clipped rows of ``per_sample`` ``[batch, params]``.

    Sums of disjoint chunks of a batch add up to the sum over the batch, so a
    caller can take per-sample gradients a chunk at a time; see
    :func:`noisy_average` for the rest of the step.
    """
    if config.mechanism != "none":
        per_sample = clip_per_sample(per_sample, norm=config.clip_norm, bound=config.clip)
    return per_sample.sum(dim=0)


def noisy_average(
    summed: torch.Tensor,
    *,
    config: DPConfig,
    plan: StepPlan,
    n_samples: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """The rest of :func:`private_gradient` after :func:`clipped_sum`: noise, then ``/ (q * N)``."""
    noisy = noisy_sum(
        summed.unsqueeze(0), mechanism=config.mechanism, scale=plan.noise_scale, generator=generator
    )
    return noisy / (plan.sample_rate * n_samples)


def local_steps(*, n_samples: int, batch_size: int, local_epochs: float) -> int:
    """Steps in ``local_epochs`` epochs of ``ceil(n_samples / batch_size)`` steps (at least 1)."""
    return max(1, round(local_epochs * -(-n_samples // batch_size)))


def plan_participation(
    config: DPConfig,
    *,
    n_samples: int,
    batch_size: int,
    local_epochs: float,
    epsilon_tolerance: float = DEFAULT_EPSILON_TOLERANCE,
) -> StepPlan:
    """Sampling rate, steps and noise for one participation of this client.

    ``q = min(1, batch_size / n_samples)``; one expected epoch is ``ceil(1/q)``
    steps (computed in integers as ``ceil(n_samples / batch_size)``), so a
    participation is ``local_epochs * ceil(1/q)`` steps. The noise is
    calibrated over ``steps * max_participations`` steps in total, so that
    ``max_participations`` identical participations spend the whole budget.
    """
    if n_samples < 1 or batch_size < 1 or not local_epochs > 0:
        raise ValueError(
            "n_samples and batch_size must be >= 1 and local_epochs > 0, got "
            f"{n_samples}, {batch_size}, {local_epochs}"
        )
    sample_rate = min(1.0, batch_size / n_samples)
    steps = local_steps(n_samples=n_samples, batch_size=batch_size, local_epochs=local_epochs)
    total_steps = steps * config.max_participations
    if config.mechanism == "gaussian":
        sigma = calibrate_gaussian(
            epsilon=config.epsilon,
            delta=config.delta,
            sample_rate=sample_rate,
            steps=total_steps,
            epsilon_tolerance=epsilon_tolerance,
        )
        return StepPlan(sample_rate, steps, sigma, sigma * config.clip)
    if config.mechanism == "laplace":
        eps0 = calibrate_laplace(epsilon=config.epsilon, sample_rate=sample_rate, steps=total_steps)
        return StepPlan(sample_rate, steps, eps0, config.clip / eps0)
    return StepPlan(sample_rate, steps, 0.0, 0.0)


class PrivacyAccountant:
    """Privacy spent by one client over its participations.

    The history holds one ``(noise_multiplier_or_eps0, sample_rate, steps)``
    entry per run of identical steps, in the order they happened, exactly like
    Opacus's accountant history. ``gaussian`` converts it to epsilon at the
    config's delta through Opacus's ``RDPAccountant``; ``laplace`` adds up the
    amplified per-step epsilons; ``none`` spends nothing and never runs out.
    """

    def __init__(self, config: DPConfig) -> None:
        self.config = config
        self._history: list[tuple[float, float, int]] = []
        self._participations = 0

    @property
    def participations(self) -> int:
        return self._participations

    @property
    def history(self) -> list[tuple[float, float, int]]:
        return list(self._history)

    def _spent(self, history: Sequence[tuple[float, float, int]]) -> float:
        if self.config.mechanism == "none" or not history:
            return 0.0
        if self.config.mechanism == "gaussian":
            # What RDPAccountant.get_epsilon computes, with the per-step RDP
            # curve cached: Opacus's compute_rdp is exactly steps * (one step),
            # and the one-step curve costs ~70 ms, far too slow per round.
            rdp = sum(_one_step_rdp(q, sigma) * steps for sigma, q, steps in history)
            with warnings.catch_warnings():
                # Opacus warns when the best order is its largest alpha; the
                # bound is still valid, only not the tightest possible.
                warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
                eps, _ = privacy_analysis.get_privacy_spent(
                    orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=self.config.delta
                )
            return float(eps)
        return math.fsum(
            steps * amplified_epsilon(eps0=eps0, sample_rate=q) for eps0, q, steps in history
        )

    def _with(
        self, *, sample_rate: float, steps: int, noise_multiplier_or_eps0: float
    ) -> list[tuple[float, float, int]]:
        _check_rate_and_steps(sample_rate, steps)
        if self.config.mechanism != "none" and not noise_multiplier_or_eps0 > 0:
            raise ValueError(
                f"noise_multiplier_or_eps0 must be > 0, got {noise_multiplier_or_eps0}"
            )
        entry = (float(noise_multiplier_or_eps0), float(sample_rate), int(steps))
        history = list(self._history)
        # Merging a run of identical steps makes the spend after
        # max_participations participations the very computation the
        # calibration did (Opacus's compute_rdp is linear in steps).
        if history and history[-1][:2] == entry[:2]:
            last = history.pop()
            entry = (last[0], last[1], last[2] + entry[2])
        history.append(entry)
        return history

    def spent_epsilon(self) -> float:
        """Epsilon spent so far (at ``config.delta`` for gaussian)."""
        return self._spent(self._history)

    def spent_epsilon_after(
        self, *, sample_rate: float, steps: int, noise_multiplier_or_eps0: float
    ) -> float:
        """Epsilon that would be spent after one more such participation."""
        return self._spent(
            self._with(
                sample_rate=sample_rate,
                steps=steps,
                noise_multiplier_or_eps0=noise_multiplier_or_eps0,
            )
        )

    def would_exceed(
        self, *, sample_rate: float, steps: int, noise_multiplier_or_eps0: float
    ) -> bool:
        """True when one more such participation would overspend the budget."""
        if self.config.mechanism == "none":
            return False
        after = self.spent_epsilon_after(
            sample_rate=sample_rate, steps=steps, noise_multiplier_or_eps0=noise_multiplier_or_eps0
        )
        return after > self.config.epsilon * (1 + BUDGET_RTOL)

    def record_participation(
        self, *, sample_rate: float, steps: int, noise_multiplier_or_eps0: float
    ) -> None:
        """Account for one participation (call before the update leaves the client)."""
        self._history = self._with(
            sample_rate=sample_rate, steps=steps, noise_multiplier_or_eps0=noise_multiplier_or_eps0
        )
        self._participations += 1

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state (floats round-trip exactly through ``json``)."""
        return {
            "mechanism": self.config.mechanism,
            "participations": self._participations,
            "history": [[noise, q, steps] for noise, q, steps in self._history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("mechanism") != self.config.mechanism:
            raise ValueError(
                f"accountant state is for mechanism {state.get('mechanism')!r}, "
                f"but this accountant uses {self.config.mechanism!r}"
            )
        history = [(float(n), float(q), int(s)) for n, q, s in state["history"]]
        participations = int(state["participations"])
        if participations < 0:
            raise ValueError(f"participations must be >= 0, got {participations}")
        self._history = history
        self._participations = participations
