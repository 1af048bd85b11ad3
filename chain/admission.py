"""What a record must satisfy to be admitted to the chain (pure: no I/O).

Every replica (``ChainState.check_record``, before it votes), ``chain
verify`` (which replays the same state) and the simulator's sequencer apply
these rules, through :class:`chain.state.ChainState`; this module is their
one implementation.

- :func:`plan_problems`: the DP plan every client is accounted under. It is
  not in any record: it follows from the genesis (``fl.rounds.privacy_plan``),
  so a chain whose genesis gives an out-of-range plan is refused as a whole
  (``ChainState`` will not start on it) instead of halting at round 1. Under
  a DP mechanism every noise (the histogram's and the training steps') must
  be a finite number > 0; every release needs ``steps >= 1`` and a sample
  rate in ``(0, 1]``; ``none`` adds no noise at all.
- :func:`registration_problems`: a registration's histogram has one bin per
  class and one for invalid labels; every bin lies in ``[-cap, cap]`` and the
  bins add up to at most ``cap``, the run's record cap
  (``fl.rounds.record_cap``): the record count a registration claims is its
  FedAvg weight and its DP-SGD divisor, so no client may claim more. Bins
  may be negative (the DP noise makes them so). An honest client fits its
  noisy release into these bounds before it registers
  (``fl.privacy.fit_histogram``, post-processing at no privacy cost).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

from fl.privacy import PrivacyPlan, Release, mechanism_of


def _release_problems(what: str, release: Release, *, noisy: bool) -> Iterator[str]:
    noise = release.noise
    if noisy and not (noise > 0 and math.isfinite(noise)):
        yield f"{what} noise must be a finite number > 0, got {noise}"
    if not noisy and noise != 0:
        yield f"{what} noise must be 0 without a DP mechanism, got {noise}"
    if not 0 < release.sample_rate <= 1:
        yield f"{what} sample rate must be in (0, 1], got {release.sample_rate}"
    if release.steps < 1:
        yield f"{what} steps must be >= 1, got {release.steps}"


def plan_problems(plan: PrivacyPlan) -> list[str]:
    """Why ``plan`` cannot account a client's releases (empty: it can)."""
    noisy = not mechanism_of(plan).is_none
    return [
        *_release_problems("registration histogram", plan.registration, noisy=noisy),
        *_release_problems("training step", plan.step.release, noisy=noisy),
    ]


def registration_problems(histogram: Sequence[int], *, num_classes: int, cap: int) -> list[str]:
    """Why a registration's ``histogram`` is not admitted (empty: it is)."""
    bins = num_classes + 1
    if len(histogram) != bins:
        return [
            f"a registration holds {bins} counts (one per class, then invalid labels), "
            f"got {len(histogram)}"
        ]
    problems = [
        f"count {i} is {count}, outside [-{cap}, {cap}] (the record cap)"
        for i, count in enumerate(histogram)
        if not -cap <= count <= cap
    ]
    total = sum(histogram)
    if total > cap:
        problems.append(f"claims {total} records, more than the record cap {cap}")
    return problems
