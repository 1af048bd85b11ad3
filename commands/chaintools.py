"""``chain show`` and ``chain verify``: read a miner's SQLite chain without running a node.

``verify`` checks every link, payload digest and commit certificate
(``consensus.ledger.verify_chain`` with an Ed25519 verifier built from the
genesis), then re-checks each record's submitter signature and replays the
records through :class:`chain.records.ChainState` (selections against
Algorithm 1 and the genesis's selection seed, reputations and privacy spent
against their recomputation).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

from chain.records import Registration, RoundSummary, RoundVerdicts, Selection, decode_operation
from chain.state import ChainState
from commands.summary import ChainCheck
from consensus.canonical import MalformedMessage
from consensus.ledger import Block, verify_chain
from node.daemon import record_verifier, roles_of
from node.genesis import GenesisError, read_genesis
from node.identity import pbft_verifier


def read_blocks(db: Path) -> list[Block]:
    """Every stored block in height order, read directly (no truncation on open)."""
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            tables = {
                r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")
            }
            table = "blocks" if "blocks" in tables else None
            if table is None:
                raise ValueError(f"{db} holds no block table")
            rows = con.execute("SELECT height, data FROM blocks ORDER BY height").fetchall()
        finally:
            con.close()
    except sqlite3.Error as exc:
        raise ValueError(f"{db} is not a readable chain database: {exc}") from exc
    blocks = []
    for height, data in rows:
        try:
            blocks.append(Block.decode(bytes(data)))
        except MalformedMessage as exc:
            raise ValueError(f"block at height {height} does not decode: {exc}") from exc
    return blocks


def _describe(record: object) -> str:
    if isinstance(record, Registration):
        *per_class, invalid = record.histogram
        return (
            f"register {record.client}: label counts {list(per_class)}, invalid {invalid} "
            f"(noisy under DP)"
        )
    if isinstance(record, Selection):
        return f"selection round {record.round}: {', '.join(record.selected)}" + (
            f" (declined {', '.join(record.declined)})" if record.declined else ""
        )
    if isinstance(record, RoundVerdicts):
        lines = [f"verdicts round {record.round}:"]
        for u in record.updates:
            verdict = "ACCEPT" if u.accepted else "REJECT"
            lines.append(
                f"    {u.client} {verdict} acc {u.accuracy:.4f} digest {u.digest.hex()[:16]} "
                f"n={u.n_samples}: {u.reason}"
            )
        if record.silent:
            lines.append(f"    silent: {', '.join(record.silent)}")
        lines.append("    reputation: " + ", ".join(f"{c} {v:.4f}" for c, v in record.reputations))
        if any(v for _, v in record.privacy):
            lines.append(
                "    epsilon spent: " + ", ".join(f"{c} {v:.3f}" for c, v in record.privacy)
            )
        return "\n".join(lines)
    if isinstance(record, RoundSummary):
        return (
            f"summary round {record.round}: model {record.model_digest.hex()[:16]}, "
            f"test accuracy {record.accuracy:.4f}, loss {record.loss:.4f}"
        )
    return repr(record)


def show_chain(db: Path, *, height: int | None = None) -> Iterator[str]:
    blocks = read_blocks(db)
    if height is not None:
        blocks = [b for b in blocks if b.height == height]
        if not blocks:
            raise ValueError(f"no block at height {height}")
    for block in blocks:
        cert = block.certificate
        signers = [s for s, _ in cert.signatures] if cert else []
        yield (
            f"block {block.height} {block.digest.hex()[:16]} "
            f"prev {block.header.previous_hash.hex()[:16]} "
            f"view {block.header.view} proposer {block.header.proposer} signers {signers}"
        )
        for request in block.requests():
            try:
                _, record = decode_operation(request.operation)
            except MalformedMessage:
                yield f"  {request.client}#{request.timestamp}: malformed record"
                continue
            yield f"  {request.client}#{request.timestamp} " + _describe(record)


def verify_chain_file(db: Path, genesis_path: Path) -> ChainCheck:
    """``chain verify``: the verdict, the chain's height and a one-line message."""
    try:
        genesis = read_genesis(genesis_path)
    except GenesisError as exc:
        raise ValueError(str(exc)) from exc
    blocks = read_blocks(db)
    height = blocks[-1].height if blocks else 0
    members = genesis.membership
    n = genesis.protocol.miners
    verdict = verify_chain(blocks, verify=pbft_verifier(members), n=n, f=genesis.protocol.f)
    if not verdict.ok:
        message = f"chain INVALID at height {verdict.first_bad_height}: {verdict.reason}"
        return ChainCheck(False, height, message)
    state = ChainState(
        genesis.run,
        clients=tuple(c.node_id for c in members.clients),
        selection_seed=genesis.protocol.selection_seed,
    )
    verify, roles = record_verifier(members), roles_of(members)
    for block in blocks:
        try:
            problem = state.check_block(block, verify=verify, role_of=roles)
        except MalformedMessage as exc:
            problem = f"malformed requests: {exc}"
        if problem:
            return ChainCheck(False, height, f"chain INVALID at height {block.height}: {problem}")
        state.apply_block(block)
    head = blocks[-1].digest.hex() if blocks else "(empty)"
    rounds = len(state.summaries)
    message = f"chain OK: {len(blocks)} blocks, {rounds} rounds summarised, head {head}"
    return ChainCheck(True, height, message)


def verify_run_chains(run_dir: Path) -> dict[str, ChainCheck]:
    """``chain verify`` on the chain of every miner of a ``network up`` run directory."""
    genesis_path = run_dir / "genesis.toml"
    try:
        miners = [m.node_id for m in read_genesis(genesis_path).membership.miners]
    except GenesisError as exc:
        raise ValueError(str(exc)) from exc
    checks = {}
    for miner in miners:
        db = run_dir / miner / "chain.db"
        if not db.exists():
            checks[miner] = ChainCheck(False, 0, f"no chain at {db}")
            continue
        try:
            checks[miner] = verify_chain_file(db, genesis_path)
        except ValueError as exc:
            checks[miner] = ChainCheck(False, 0, str(exc))
    return checks
