"""Validation of client updates: hard checks, then Algorithm 2 of Wu & Kang.

Hard checks (any failure rejects, with the reason): the update has exactly
the model's tensor names, each with the model's shape and dtype; every value
is finite; it copies no update the chain has seen (``fl.copies``: an earlier
round's or another of its round, exactly or within a tolerance); its L2
norm is within the absolute bound (if set), within ``norm_factor`` times the
round's median norm (a boosted update stands out even when DP noise makes
every norm large), and, with the relative rule and
``norm_spread`` on, at most ``median + k * max(MAD, norm_mad_floor * median)``
of the round's norms. Under local DP on IID data the noise sets nearly every
honest norm (its length is fixed by sigma, clip and the dimension), so
honest norms bunch within a few percent, while a poisoned direction such as
label flipping adds a large coherent gradient on top: its accuracy can look
ordinary, its norm does not. It is off by default: on non-IID data with
little noise honest norms differ by client, and the test rejected enough
honest updates (3-4 of 20 a round at epsilon 20 and 50) to starve the
federation.

With ``cosine_spread`` on (relative rule only), each surviving update is
also compared in direction with the others of its round: the cosine between
the update and the sum of the others is rejected below ``median - k *
max(MAD, cosine_mad_floor)`` of the round's cosines, the MAD taken over the
upper half. On IID data honest DP updates share the round's descent
direction and their cosines bunch within a few hundredths; a label-flipped
update points elsewhere (cosine 0.0-0.1 where honest ones are 0.25-0.3 in
the first rounds). This is what catches label flipping under DP while the
model is still near random, where neither the accuracy nor the norm of one
noisy update tells it apart. Later in a run a
group of flipped updates can agree with each other more than honest ones do,
so the test is one-sided and the norm spread test covers those rounds. Off
by default for the same reason as ``norm_spread``: clients of non-IID data
legitimately point in different directions.

With ``reference_cosine`` on (relative rule only; it runs before the
``cosine_spread`` test), each surviving update is compared with a direction
the updates cannot move: the miners' reference update, the mean of the
per-sample gradients of their validation set at the global model, each
clipped to the clients' bound (``reference_direction``; the root update of
FLTrust, Cao et al. 2021). An update whose cosine with it is below ``median -
k * max(MAD, floor)`` of the round's cosines is rejected, the MAD over the
upper half, the floor three standard deviations of the cosine that
isotropic noise alone gives at the median's angle. The round-sum test is
pulled by colluding updates: when the global model swings under server
momentum every update points the same way, and four label-flipped updates
in a round of ten lifted each other over its cut; against the clean
reference every flipped update of the first 17 rounds of the benchmark's
seed-0 run sits 0.05 or more below every honest update of its round.
Later in a run, once the model is good, label-flipped updates align with
the reference as well as honest ones or better (the norm spread test
catches those), and no test that is relative to its round holds when
attackers are a majority of it. Off by default: like the other spread
tests, it assumes IID clients.

Algorithm 2 scores each surviving update by the accuracy of
``global + update`` on the miners' validation set.  Because local DP noise
lowers every update's accuracy, the paper's absolute threshold rejects
honest clients; the default ``relative`` rule compares each update with the
others of the same round and rejects those below
``median - k * max(MAD, mad_floor)`` (median absolute deviation; the floor
stops a round of near-identical scores from rejecting tiny differences).
``absolute`` is the paper's rule: reject below ``min_accuracy``. The rules
are registered in ``RULE_REGISTRY`` by name (a :class:`Rule` judges a
round's accuracies and says whether the round-relative tests apply), so a
new rule is one more registered class.
"""

from __future__ import annotations

import math
import statistics
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from fl.copies import COPY_TOLERANCE, RoundHistory, copied_updates
from fl.models import FLModel
from fl.privacy import clip_per_sample
from fl.registry import Registry
from fl.training import PER_SAMPLE_CHUNK, evaluate, per_sample_gradients
from fl.weights import Weights, flat_by_name, set_weights, unflatten


@dataclass(frozen=True)
class ValidationParams:
    rule: str = "relative"
    mad_k: float = 3.0
    mad_floor: float = 0.02
    min_accuracy: float = 0.5
    norm_bound: float | None = None
    norm_factor: float = 3.0
    norm_spread: bool = False
    norm_mad_floor: float = 0.03
    cosine_spread: bool = False
    cosine_mad_floor: float = 0.02
    reference_cosine: bool = False
    reference_clip: float = 1.0
    reference_floor_sds: float = 3.0
    copy_tolerance: float = COPY_TOLERANCE

    def __post_init__(self) -> None:
        if self.rule not in RULE_REGISTRY:
            raise ValueError(
                f"validation rule must be one of {', '.join(RULE_REGISTRY.names())}, "
                f"got {self.rule!r}"
            )
        if not self.mad_k > 0 or not self.mad_floor >= 0 or not self.norm_factor > 1:
            raise ValueError("need mad_k > 0, mad_floor >= 0 and norm_factor > 1")
        if not self.norm_mad_floor >= 0 or not self.cosine_mad_floor >= 0:
            raise ValueError("norm and cosine MAD floors must be >= 0")
        if not self.reference_clip > 0 or not self.reference_floor_sds >= 0:
            raise ValueError("need reference_clip > 0 and reference_floor_sds >= 0")
        if not 0 <= self.copy_tolerance < 1:
            raise ValueError(f"copy tolerance must be in [0, 1), got {self.copy_tolerance}")
        if not 0 <= self.min_accuracy <= 1:
            raise ValueError(f"min accuracy must be in [0, 1], got {self.min_accuracy}")
        if self.norm_bound is not None and not self.norm_bound > 0:
            raise ValueError(f"norm bound must be positive, got {self.norm_bound}")


@dataclass(frozen=True)
class Verdict:
    client: str
    accepted: bool
    reason: str
    accuracy: float | None = None
    norm: float | None = None


def update_norm(delta: Weights) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in delta.values()))


def structural_problem(delta: Mapping[str, torch.Tensor], reference: Weights) -> str | None:
    """The first hard-check failure of names, shapes, dtypes and finiteness, or None."""
    missing = [k for k in reference if k not in delta]
    extra = [k for k in delta if k not in reference]
    if missing or extra:
        return f"tensor names differ from the model (missing {missing}, unexpected {extra})"
    for name, ref in reference.items():
        t = delta[name]
        if tuple(t.shape) != tuple(ref.shape):
            return f"{name}: shape {tuple(t.shape)} != model shape {tuple(ref.shape)}"
        if t.dtype != ref.dtype:
            return f"{name}: dtype {t.dtype} != model dtype {ref.dtype}"
        if not bool(torch.isfinite(t).all()):
            return f"{name}: contains NaN or infinite values"
    return None


def median_and_mad(values: Iterable[float], *, upper_half: bool = False) -> tuple[float, float]:
    """The median and the median absolute deviation from it; with
    ``upper_half`` the deviation is taken over the values at or above the
    median only (the side outliers below it cannot widen)."""
    ordered = sorted(values)
    med = statistics.median(ordered)
    return med, statistics.median(
        sorted(abs(v - med) for v in ordered if not upper_half or v >= med)
    )


def _low_cosines(
    cosines: Mapping[str, float],
    *,
    mad_k: float,
    floor: Callable[[float], float],
    against: str,
) -> dict[str, str]:
    """The ids whose cosine is below ``median - mad_k * max(MAD, floor(median))``
    of the round's cosines, with the reason; the MAD is taken over the upper
    half (the honest side: updates pointing away sit below the median and
    would widen a two-sided MAD, and three or four of ten can). Needs three
    cosines."""
    if len(cosines) < 3:
        return {}
    med, mad = median_and_mad(cosines.values(), upper_half=True)
    cut = med - mad_k * max(mad, floor(med))
    return {
        cid: (
            f"direction: cosine with {against} {c:.3f} < round median "
            f"{med:.3f} - {mad_k:g}*MAD = {cut:.3f}"
        )
        for cid, c in cosines.items()
        if c < cut
    }


def direction_outliers(
    deltas: Mapping[str, Mapping[str, torch.Tensor]], *, mad_k: float, floor: float
) -> dict[str, str]:
    """Updates pointing away from the rest of their round, with the reason.

    For each update, the cosine with the sum of the round's other updates
    (float64, tensors in name order, summed in client-id order, so the
    numbers do not depend on the order updates or tensors arrived in);
    rejected by ``_low_cosines``. Needs three updates; zero vectors are left
    to the other tests.
    """
    if len(deltas) < 3:
        return {}
    ids = sorted(deltas)
    flat = {cid: flat_by_name(deltas[cid]) for cid in ids}
    total = torch.zeros_like(flat[ids[0]])
    for cid in ids:
        total += flat[cid]
    cosines: dict[str, float] = {}
    for cid in ids:
        others = total - flat[cid]
        scale = float(flat[cid].norm()) * float(others.norm())
        if scale > 0:
            cosines[cid] = float(flat[cid] @ others) / scale
    return _low_cosines(
        cosines, mad_k=mad_k, floor=lambda _: floor, against="the round's other updates"
    )


def reference_direction(
    model: FLModel, weights: Weights, x: torch.Tensor, y: torch.Tensor, *, clip: float
) -> OrderedDict[str, torch.Tensor]:
    """The miners' reference update: minus the mean over ``(x, y)`` (the
    validation set) of the per-sample gradients at ``weights``, each clipped
    to L2 norm ``clip`` (float64). It is the step a client holding the
    validation set would take with clipped DP-SGD and no noise: the direction
    honest updates share in expectation on IID data. After FLTrust (Cao et
    al., NDSS 2021), whose server trains on a small clean root dataset;
    ``model`` is scratch space.
    """
    set_weights(model, weights)
    model.eval()
    params = {k: v.detach() for k, v in model.named_parameters()}
    per_sample = per_sample_gradients(model)
    total = torch.zeros(sum(p.numel() for p in params.values()), dtype=torch.float64)
    n = int(y.shape[0])
    for start in range(0, n, PER_SAMPLE_CHUNK):
        grads, _ = per_sample(
            params, x[start : start + PER_SAMPLE_CHUNK], y[start : start + PER_SAMPLE_CHUNK]
        )
        flat = torch.cat([grads[k].reshape(grads[k].shape[0], -1) for k in params], dim=1)
        total += clip_per_sample(flat.double(), norm="l2", bound=clip).sum(dim=0)
    return unflatten(-total / max(n, 1), OrderedDict((k, v.double()) for k, v in params.items()))


def reference_outliers(
    deltas: Mapping[str, Mapping[str, torch.Tensor]],
    reference: Mapping[str, torch.Tensor],
    *,
    mad_k: float,
    floor_sds: float,
) -> dict[str, str]:
    """Updates pointing away from ``reference`` (``reference_direction``) more
    than the rest of their round, with the reason: each update's cosine with
    the reference (float64, tensors in name order), rejected by
    ``_low_cosines``. Unlike ``direction_outliers`` the reference does not
    move with the updates, so colluding attackers cannot pull it their way.

    The MAD floor is ``floor_sds`` standard deviations of the cosine that
    isotropic noise alone gives an update at the median's angle to the
    reference in ``d`` dimensions, ``sqrt((1 - median^2) / d)``: below that
    spread the round's cosines differ by noise, not by intent. Honest DP
    updates at a cosine of 0.84 (where a swinging global model puts them)
    bunch three times tighter than at 0.3, and a fixed floor wide enough for
    the latter would let a label-flipped update at 0.78 through.
    """
    ref = flat_by_name(reference)
    ref_norm = float(ref.norm())
    cosines: dict[str, float] = {}
    for cid in sorted(deltas):
        flat = flat_by_name(deltas[cid])
        scale = float(flat.norm()) * ref_norm
        if scale > 0:
            cosines[cid] = float(flat @ ref) / scale
    dim = ref.numel()
    return _low_cosines(
        cosines,
        mad_k=mad_k,
        floor=lambda med: floor_sds * math.sqrt(max(0.0, 1.0 - med * med) / dim),
        against="the validation set's clipped descent",
    )


class Rule:
    """Algorithm 2's decision over a round's validation accuracies."""

    # The round-relative spread tests (norm spread, cosine spread, reference
    # cosine) apply under this rule.
    relative: bool = False

    def judge(
        self, accuracies: Mapping[str, float], params: ValidationParams
    ) -> dict[str, Verdict]:
        raise NotImplementedError


RULE_REGISTRY: Registry[type[Rule]] = Registry("validation rule")


@RULE_REGISTRY.register("relative")
class RelativeRule(Rule):
    """Reject below the round's ``median - k * max(MAD, mad_floor)``."""

    relative = True

    def judge(
        self, accuracies: Mapping[str, float], params: ValidationParams
    ) -> dict[str, Verdict]:
        verdicts: dict[str, Verdict] = {}
        med, mad = median_and_mad(accuracies.values())
        cut = med - params.mad_k * max(mad, params.mad_floor)
        for cid, acc in accuracies.items():
            ok = acc >= cut
            relation = ">=" if ok else "<"
            reason = (
                f"validation accuracy {acc:.4f} {relation} round median {med:.4f} "
                f"- {params.mad_k:g}*MAD = {cut:.4f}"
            )
            verdicts[cid] = Verdict(cid, ok, reason, acc)
        return verdicts


@RULE_REGISTRY.register("absolute")
class AbsoluteRule(Rule):
    """The paper's rule: reject below ``min_accuracy``."""

    def judge(
        self, accuracies: Mapping[str, float], params: ValidationParams
    ) -> dict[str, Verdict]:
        verdicts: dict[str, Verdict] = {}
        for cid, acc in accuracies.items():
            ok = acc >= params.min_accuracy
            relation = ">=" if ok else "<"
            reason = f"validation accuracy {acc:.4f} {relation} threshold {params.min_accuracy:.4f}"
            verdicts[cid] = Verdict(cid, ok, reason, acc)
        return verdicts


RULES: tuple[str, ...] = RULE_REGISTRY.names()


def rule_of(name: str) -> Rule:
    """The validation rule registered as ``name``."""
    return RULE_REGISTRY.get(name)()


def judge_accuracies(
    accuracies: Mapping[str, float], params: ValidationParams
) -> dict[str, Verdict]:
    """Algorithm 2's decision over the validation accuracies of one round."""
    if not accuracies:
        return {}
    return rule_of(params.rule).judge(accuracies, params)


def _reject(verdicts: dict[str, Verdict], norms: dict[str, float], reasons: dict[str, str]) -> None:
    """Reject each id of ``reasons`` with its reason; it leaves ``norms`` (the survivors)."""
    for cid, reason in reasons.items():
        verdicts[cid] = Verdict(cid, False, reason, norm=norms.pop(cid))


def validate_updates(
    *,
    model: FLModel,
    global_weights: Weights,
    updates: Sequence[tuple[str, Mapping[str, torch.Tensor]]],
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    params: ValidationParams,
    history: RoundHistory | None = None,
) -> dict[str, Verdict]:
    """Verdict for every ``(client, delta)`` of one round; ``model`` is scratch space.

    ``history``: what the round's updates are checked against for copies
    (``fl.copies``); None skips that check (unit tests of the other checks).
    """
    relative = rule_of(params.rule).relative
    verdicts: dict[str, Verdict] = {}
    norms: dict[str, float] = {}
    sound: dict[str, Mapping[str, torch.Tensor]] = {}
    for cid, delta in updates:
        problem = structural_problem(delta, global_weights)
        if problem is not None:
            verdicts[cid] = Verdict(cid, False, f"malformed: {problem}")
        else:
            sound[cid] = delta
    copies: dict[str, str] = {}
    if history is not None:
        copies = copied_updates(sound, history, tolerance=params.copy_tolerance)
    for cid, delta in sound.items():
        if cid in copies:
            verdicts[cid] = Verdict(cid, False, copies[cid])
            continue
        norm = update_norm(delta)
        if params.norm_bound is not None and norm > params.norm_bound:
            verdicts[cid] = Verdict(
                cid, False, f"update norm {norm:.3f} exceeds bound {params.norm_bound:g}", norm=norm
            )
            continue
        norms[cid] = norm
    if norms:
        median_norm, mad_norm = median_and_mad(norms.values())
        spread_cut = median_norm + params.mad_k * max(mad_norm, params.norm_mad_floor * median_norm)
        for cid, norm in list(norms.items()):
            if median_norm > 0 and norm > params.norm_factor * median_norm:
                reason = (
                    f"update norm {norm:.3f} > {params.norm_factor:g} x "
                    f"round median {median_norm:.3f}"
                )
            elif params.norm_spread and relative and norm > spread_cut:
                reason = (
                    f"update norm {norm:.3f} > round median {median_norm:.3f} "
                    f"+ {params.mad_k:g}*MAD = {spread_cut:.3f}"
                )
            else:
                continue
            verdicts[cid] = Verdict(cid, False, reason, norm=norm)
            del norms[cid]
    deltas = dict(updates)
    if relative:
        # The fixed reference first: attackers it removes no longer pull the
        # round's sum in the second test.
        if params.reference_cosine and norms:
            reference = reference_direction(
                model, global_weights, x_val, y_val, clip=params.reference_clip
            )
            _reject(
                verdicts,
                norms,
                reference_outliers(
                    {cid: deltas[cid] for cid in norms},
                    reference,
                    mad_k=params.mad_k,
                    floor_sds=params.reference_floor_sds,
                ),
            )
        if params.cosine_spread:
            _reject(
                verdicts,
                norms,
                direction_outliers(
                    {cid: deltas[cid] for cid in norms},
                    mad_k=params.mad_k,
                    floor=params.cosine_mad_floor,
                ),
            )
    accuracies: dict[str, float] = {}
    for cid in norms:
        candidate = {k: global_weights[k] + deltas[cid][k] for k in global_weights}
        set_weights(model, candidate)
        _, accuracies[cid] = evaluate(model, x_val, y_val)
    for cid, verdict in judge_accuracies(accuracies, params).items():
        verdicts[cid] = Verdict(cid, verdict.accepted, verdict.reason, verdict.accuracy, norms[cid])
    return verdicts
