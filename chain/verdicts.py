"""A round's verdicts: when a miner submits them, how it builds them, how it checks another's.

Pure protocol rules, carved out of the miner daemon so that they can be
tested without sockets or an event loop; ``node.miner`` supplies what they
need (the held uploads, its own validation, the time) and the simulator
(``chain.simulator``) builds its verdict records with the same
:func:`build_verdicts`.

- :func:`admits_malformed`: a correctly signed update that was refused for
  its values (NaN) still counts as the client's update of the open round,
  recorded as rejected, when it was made for this round's model.
- :func:`round_ready` and :func:`submits_now`: a round is ready once every
  selected client uploaded, or at its deadline; the primary submits then, a
  backup submits its own verdicts only when none committed within two view
  timeouts after that (the primary may be down), so a round normally adds
  one verdict record.
- :func:`build_verdicts`: the record, with reputations and privacy spent
  recomputed from the chain.
- :func:`check_verdicts`: another miner's record against the uploads this
  miner holds and its own validation of them.
- :func:`round_history`: what the copy check (``fl.copies``) compares a
  round's updates with, from the chain and the blobs it names, the same
  for every miner and the simulator.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from chain.models import FetchUpdate
from chain.records import RoundVerdicts, UpdateRecord
from chain.state import ChainState
from fl.copies import COPY_WINDOW, RoundHistory, SeenUpdate
from fl.validation import Verdict

# Replicas agree on verdicts exactly and on validation accuracies within this
# (absolute) tolerance; one validation image is 1/val_size, so any real
# disagreement about a prediction exceeds it for val_size < 1000.
ACCURACY_TOLERANCE: Final = 1e-6


@dataclass(frozen=True)
class Upload:
    """What a miner holds of one client's update: the fields of its signed claim."""

    client: str
    round: int
    digest: bytes
    base_digest: bytes
    n_samples: int
    claim_signature: bytes


OwnVerdict = tuple[bool, str, float]
"""(accepted, reason, validation accuracy; NaN when the update was never evaluated)."""

OwnValidation = Callable[[Sequence[tuple[str, bytes, int]]], Mapping[str, OwnVerdict]]
"""This miner's verdicts on (client, digest, samples) of the round being checked."""


def own_verdicts(verdicts: Mapping[str, Verdict]) -> dict[str, OwnVerdict]:
    """``fl.validation`` verdicts as :data:`OwnVerdict` tuples."""
    return {
        cid: (v.accepted, v.reason, math.nan if v.accuracy is None else v.accuracy)
        for cid, v in verdicts.items()
    }


def admits_malformed(
    state: ChainState, upload: Upload, *, model_digest: Callable[[], bytes | None]
) -> bool:
    """Whether a signed update refused for its values is the client's update of the open round.

    ``model_digest()``: the digest of the open round's global model (None
    while it cannot be recomputed); asked only for an upload of that round.
    """
    rnd = upload.round
    if rnd != state.current_round or upload.client not in state.selections[rnd].selected:
        return False
    digest = model_digest()
    return (
        digest is not None
        and upload.base_digest == digest
        and upload.n_samples == state.released_records(upload.client)
    )


def uploads_complete(state: ChainState, rnd: int, held: Mapping[str, object]) -> bool:
    """Every selected client of round ``rnd`` has an update (valid or malformed) held."""
    return all(cid in held for cid in state.selections[rnd].selected)


def round_ready(*, complete: bool, now: float, opened_at: float, deadline: float) -> bool:
    """Whether a round's verdicts can be given: every upload is in, or its deadline passed.

    ``opened_at``: when this miner saw the round's selection commit;
    ``deadline``: the round deadline, in seconds after that.
    """
    return complete or now >= opened_at + deadline


def submits_now(*, is_primary: bool, now: float, ready_at: float, fallback: float) -> bool:
    """Whether this miner submits its verdict record for a ready round now.

    The primary at once; a backup only ``fallback`` seconds (two view
    timeouts) after the round became ready (``ready_at``), in case the
    primary is down and no verdicts committed.
    """
    return is_primary or now >= ready_at + fallback


def build_verdicts(
    state: ChainState,
    rnd: int,
    *,
    held: Mapping[str, Upload],
    own: Mapping[str, OwnVerdict],
    malformed: Mapping[str, tuple[Upload, str]],
) -> RoundVerdicts:
    """The verdict record of round ``rnd``.

    ``held``: the evaluated uploads of selected clients; ``own``: this
    miner's verdicts on them; ``malformed``: uploads refused for their
    values, with the reason (ignored for a client that also has a held one).
    """
    selected = set(state.selections[rnd].selected)
    good = {cid: up for cid, up in held.items() if cid in selected}
    bad = {cid: v for cid, v in malformed.items() if cid in selected and cid not in good}
    updates = []
    for cid in sorted([*good, *bad]):
        if cid in bad:
            up, reason = bad[cid]
            accepted, accuracy = False, math.nan
        else:
            up = good[cid]
            accepted, reason, accuracy = own[cid]
        updates.append(
            UpdateRecord(
                cid,
                up.digest,
                up.base_digest,
                up.n_samples,
                accuracy,
                accepted,
                reason,
                up.claim_signature,
            )
        )
    silent = tuple(sorted(selected - {u.client for u in updates}))
    draft = RoundVerdicts(rnd, tuple(updates), silent, (), ())
    return RoundVerdicts(
        rnd,
        tuple(updates),
        silent,
        state.reputations_after(rnd, draft),
        state.privacy_after(draft),
    )


def check_verdicts(
    state: ChainState,
    record: RoundVerdicts,
    *,
    model_digest: bytes | None,
    held: Callable[[UpdateRecord], Upload | None],
    malformed: Mapping[str, tuple[Upload, str]],
    validate: OwnValidation,
) -> str:
    """'' when this miner agrees with another miner's verdict record, else why not.

    ``model_digest``: the round's global model as this miner recomputes it;
    ``held(u)``: the upload behind ``u`` as this miner holds it;
    ``malformed``: this miner's evidence of updates refused for their values.
    """
    if model_digest is None:
        return f"no global model for round {record.round}"
    evaluated = []
    for u in record.updates:
        upload = held(u)
        if upload is None:
            problem = _check_malformed_entry(u, malformed.get(u.client))
            if problem:
                return problem
            continue
        evaluated.append(u)
        if (
            upload.client != u.client
            or upload.round != record.round
            or upload.n_samples != u.n_samples
            or upload.base_digest != u.base_digest
            or u.base_digest != model_digest
            or upload.claim_signature != u.claim_signature
        ):
            return f"{u.client}: record does not match the signed update"
    own = validate([(u.client, u.digest, u.n_samples) for u in evaluated])
    return verdicts_agree(RoundVerdicts(record.round, tuple(evaluated), (), (), ()), own)


def _check_malformed_entry(u: UpdateRecord, seen: tuple[Upload, str] | None) -> str:
    if seen is None or seen[0].digest != u.digest:
        return f"{u.client}: update {u.digest.hex()[:12]} not held"
    evidence, reason = seen
    if (
        u.accepted
        or u.reason != reason
        or not math.isnan(u.accuracy)
        or u.claim_signature != evidence.claim_signature
        or u.n_samples != evidence.n_samples
        or u.base_digest != evidence.base_digest
    ):
        return f"{u.client}: malformed update recorded differently"
    return ""


def verdicts_agree(claimed: RoundVerdicts, own: Mapping[str, OwnVerdict]) -> str:
    """'' when ``own`` (client -> accepted, reason, accuracy) matches ``claimed``'s verdicts.

    Verdicts must be equal; accuracies within :data:`ACCURACY_TOLERANCE`
    (NaN, an update never evaluated, matches only NaN).
    """
    if sorted(own) != [u.client for u in claimed.updates]:
        return "verdicts cover other clients than the replica's own validation"
    for u in claimed.updates:
        accepted, _reason, accuracy = own[u.client]
        if accepted != u.accepted:
            return f"{u.client}: verdict {u.accepted} but the replica finds {accepted}"
        both_nan = math.isnan(accuracy) and math.isnan(u.accuracy)
        if not both_nan and not abs(accuracy - u.accuracy) <= ACCURACY_TOLERANCE:
            return f"{u.client}: accuracy {u.accuracy} but the replica finds {accuracy}"
    return ""


def round_history(
    state: ChainState,
    rnd: int,
    *,
    base_digest: bytes,
    digests: Mapping[str, bytes],
    fetch: FetchUpdate,
) -> RoundHistory | None:
    """What round ``rnd``'s updates are checked against for copies (``fl.copies``).

    Every update record of the rounds before ``rnd`` on the chain, with the
    tensors of the accepted ones of the last ``COPY_WINDOW`` rounds
    (``fetch``, as ``chain.models.GlobalModels`` gets them: every miner
    holds them to recompute the global model). ``base_digest``: round
    ``rnd``'s global model; ``digests``: client -> its update's digest in
    round ``rnd``. None while an accepted update's tensors are not at hand.
    """
    seen = []
    for r in sorted(state.verdicts):
        if r >= rnd:
            break
        for u in state.verdicts[r].updates:
            delta = None
            if u.accepted and r >= rnd - COPY_WINDOW:
                update = fetch(u)
                if update is None:
                    return None
                delta = update.delta
            seen.append(SeenUpdate(u.client, r, u.digest, u.base_digest, delta))
    return RoundHistory(base_digest, dict(digests), tuple(seen))
