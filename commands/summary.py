"""A run's summary in a few lines of text, from its metrics document.

Pure: it reads the document (``chain.metrics.metrics_document``) and,
when given, the result of verifying each miner's chain; it prints nothing
and opens no file. ``simulate`` and ``network up`` print it at the end of
a run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# Relative slack when comparing the privacy spent with the budget: the
# accountants stop a client at the budget, up to floating-point rounding.
BUDGET_SLACK = 1e-9
LISTED = 5  # at most this many honest clients named in the wrongly-rejected line


@dataclass(frozen=True)
class ChainCheck:
    """What ``chain verify`` found in one miner's chain."""

    ok: bool
    height: int
    message: str


def _rounds_text(rounds: Sequence[int]) -> str:
    return ("round " if len(rounds) == 1 else "rounds ") + ", ".join(str(r) for r in rounds)


def accuracy_line(doc: dict[str, Any]) -> str:
    rounds = doc["rounds"]
    if not rounds:
        return "accuracy: no round completed"
    best = max(rounds, key=lambda r: r["accuracy"])
    configured = doc.get("config", {}).get("rounds", len(rounds))
    done = f"{len(rounds)} of {configured} rounds" if len(rounds) < configured else ""
    line = (
        f"accuracy: final {100 * rounds[-1]['accuracy']:.1f} % (round {rounds[-1]['round']}), "
        f"best {100 * best['accuracy']:.1f} % (round {best['round']})"
    )
    if doc.get("interrupted") or done:
        line += f"; interrupted after {done or f'{len(rounds)} rounds'}"
    return line


def privacy_lines(doc: dict[str, Any]) -> list[str]:
    config = doc.get("config", {})
    if config.get("dp", "none") == "none":
        return ["privacy: no DP (updates are sent as trained)"]
    budget = float(config["epsilon"])
    rounds = doc["rounds"]
    mechanism = config["dp"]
    if not rounds or rounds[-1].get("epsilon_spent_max") is None:
        return [f"privacy: {mechanism} local DP, budget ε = {budget:g} per client; nothing spent"]
    last = rounds[-1]
    most = float(last["epsilon_spent_max"])
    mean = last.get("epsilon_spent_mean")
    within = most <= budget * (1 + BUDGET_SLACK)
    delta = doc.get("privacy", {}).get("delta", config.get("delta"))
    at = f"ε = {budget:g}" + (f", δ = {delta:g}" if mechanism == "gaussian" and delta else "")
    spent = f"max {most:.2f}" + (f", mean {float(mean):.2f}" if mean is not None else "")
    verdict = "within budget" if within else "OVER BUDGET"
    lines = [
        f"privacy: {mechanism} local DP, {at} per client; "
        f"spent at the end: {spent} over clients, {verdict}"
    ]
    declined = last.get("declined", [])
    if declined:
        lines.append(
            f"  {len(declined)} client{'s' if len(declined) > 1 else ''} had spent "
            f"{'their' if len(declined) > 1 else 'its'} budget and sat out round {last['round']}"
        )
    return lines


def attacker_lines(doc: dict[str, Any]) -> list[str]:
    """Each attacker's fate, and the honest clients the miners rejected."""
    config = doc.get("config", {})
    attackers = list(config.get("malicious_clients", []))
    rounds = doc["rounds"]
    if not attackers:
        lines = ["attackers: none"]
    else:
        clients = config.get("clients")
        of = f" of {clients} clients" if clients else ""
        lines = [f"attackers: {len(attackers)}{of}, attack {config.get('attack', '?')!r}"]
        if not config.get("validation", True):
            lines[0] += " (validation off: every update is accepted)"
        reputation = rounds[-1].get("reputation", {}) if rounds else {}
        honest = [v for c, v in reputation.items() if c not in attackers]
        if honest:
            lines[0] += (
                f"; final reputation of honest clients {sum(honest) / len(honest):.2f} on average"
            )
        for cid in attackers:
            lines.append("  " + _attacker_line(cid, rounds, reputation))
    wrong = [
        (r["round"], cid)
        for r in rounds
        for cid in r.get("rejected", {})
        if cid not in set(attackers)
    ]
    if wrong:
        named = ", ".join(f"{cid} (round {rnd})" for rnd, cid in wrong[:LISTED])
        more = f", and {len(wrong) - LISTED} more" if len(wrong) > LISTED else ""
        lines.append(f"honest updates rejected: {len(wrong)}: {named}{more}")
    else:
        lines.append("honest updates rejected: none")
    return lines


def _attacker_line(cid: str, rounds: list[dict[str, Any]], reputation: Mapping[str, float]) -> str:
    def where(outcome: str) -> list[int]:
        return [r["round"] for r in rounds if cid in r.get(outcome, ())]

    selected, rejected, accepted, silent = map(
        where, ("selected", "rejected", "accepted", "silent")
    )
    if not selected:
        parts = ["never selected"]
    else:
        parts = [f"selected in {_rounds_text(selected)}"]
        if rejected:
            first = next(r for r in rounds if cid in r.get("rejected", {}))
            why = first["rejected"][cid]
            more = f" (first: {why})" if len(rejected) > 1 else f" ({why})"
            parts.append(f"rejected in {_rounds_text(rejected)}{more}")
        if silent:
            parts.append(f"silent in {_rounds_text(silent)}")
        parts.append(f"accepted in {_rounds_text(accepted)}" if accepted else "never accepted")
    if cid in reputation:
        parts.append(f"reputation {reputation[cid]:.2f}")
    return f"{cid}: " + "; ".join(parts)


def chain_lines(
    checks: Mapping[str, ChainCheck], heads: Mapping[str, str] | None = None
) -> list[str]:
    """One line when every miner's chain verified at the same height, else one per miner.

    ``heads`` (miner -> head hash, as ``network up`` reads them) adds whether
    the miners agree.
    """
    if not checks:
        return []
    heights = {c.height for c in checks.values()}
    agree = ""
    if heads:
        agree = ", one head" if len(set(heads.values())) == 1 else ", DIFFERENT heads"
    if all(c.ok for c in checks.values()) and len(heights) == 1:
        many = len(checks) > 1
        return [
            f"chain: {len(checks)} miner{'s' if many else ''} at height {heights.pop()}{agree}; "
            f"`chain verify` OK on {'every one' if many else 'it'}"
        ]
    lines = [f"chain: `chain verify` per miner{agree}:"]
    for node, check in sorted(checks.items()):
        lines.append(f"  {node}: height {check.height}: {check.message}")
    return lines


def run_summary(
    doc: dict[str, Any],
    *,
    chains: Mapping[str, ChainCheck] | None = None,
    files: Mapping[str, str] | None = None,
) -> list[str]:
    """The summary of a run: a headline, then accuracy, privacy, attackers, chains, files.

    ``chains`` maps a miner to the verification of its chain; ``files`` a
    description ("plot", "metrics") to a path.
    """
    rounds = len(doc["rounds"])
    headline = f"run summary: {rounds} round{'s' if rounds != 1 else ''}"
    if doc.get("total_seconds") is not None:
        headline += f" in {doc['total_seconds']:.1f} s"
    lines = [accuracy_line(doc), *privacy_lines(doc), *attacker_lines(doc)]
    lines += chain_lines(chains or {}, doc.get("chain_heads"))
    lines += [f"{what}: {path}" for what, path in (files or {}).items()]
    return [headline, *("  " + line for line in lines)]
