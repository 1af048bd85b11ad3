"""The network file ``genesis.toml``: protocol parameters, run config, membership.

Every daemon of one network reads the same genesis: the consensus and
transport parameters, the selection weights w1..w5 (Algorithm 1), the
federated run's :class:`~fl.config.RunConfig` (which holds the DP settings),
and the list of nodes with their role, address and Ed25519 public key.
Loading validates everything and raises :class:`GenesisError` with a plain
message. :func:`init_network` writes a fresh genesis and one key file per
node (``python cli.py network init``).

Layout::

    version = 1
    [protocol]   f, miners (n = 3f+1), tick_ms, view_timeout_ms,
                 round_deadline_ms, chunk_bytes, max_stream_bytes,
                 selection_seed ("block" or "run"), testbed (bool: reproducible
                 DP noise allowed), tls_ca_sha256 (the network CA's digest;
                 empty: plaintext gRPC)
    [selection]  w1, w2, w3 (self-assessment), w4, w5 (self vs reputation)
    [run]        RunConfig fields (unset optional fields are omitted)
    [[nodes]]    id, role, address ("host:port" it listens on; a client, which
                 dials out: its host only), public_key (hex),
                 replica (miners: 0..n-1), client_index (clients: 0..K-1)
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Final

import tomli_w

from chain.records import SELECTION_SEEDS
from fl.config import RunConfig
from node.membership import (
    ROLES,
    GenesisError,
    Membership,
    NodeInfo,
    check_client_host,
    check_keys,
    node_from_dict,
    node_problems,
    split_address,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

GENESIS_VERSION: Final = 1
GENESIS_FILE: Final = "genesis.toml"
KEYS_DIR: Final = "keys"
MAX_CHUNK_BYTES: Final = 1 << 20
DEFAULT_BASE_PORT: Final = 50051
_SHA256_HEX: Final = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class ProtocolParams:
    """Consensus and transport parameters shared by every node."""

    f: int = 1
    miners: int = 4
    tick_ms: int = 50
    view_timeout_ms: int = 1000
    round_deadline_ms: int = 120_000
    chunk_bytes: int = MAX_CHUNK_BYTES
    max_stream_bytes: int = 64 << 20
    # Where the selection draw's seed comes from (chain.records.ChainState):
    # "block", the digest of the block that closed the previous round
    # (docs/NETWORK.md, "The selection seed"); "run", fl.rounds.selection_seed
    # of the run seed and the round, as in `simulate`, so that a network run
    # can be compared with it.
    selection_seed: str = "block"
    # A testbed is a network for experiments on public data (`network up`, the
    # tests), where the run may ask for reproducible (public) DP noise; a
    # deployment (`network init` without --testbed) never allows it.
    testbed: bool = False
    # SHA-256 (hex) of the network CA's certificate (node.tls): every node
    # serves and dials with mutual TLS under that CA. Empty: plaintext gRPC
    # (`--insecure`, for experiments only).
    tls_ca_sha256: str = ""

    def problems(self) -> Iterator[str]:
        if self.f < 1:
            yield f"protocol.f must be >= 1, got {self.f}"
        if self.miners != 3 * self.f + 1:
            yield (
                f"protocol.miners must be 3f+1 = {3 * self.f + 1} for f = {self.f}, "
                f"got {self.miners}"
            )
        for name in ("tick_ms", "view_timeout_ms", "round_deadline_ms"):
            if getattr(self, name) < 1:
                yield f"protocol.{name} must be >= 1, got {getattr(self, name)}"
        if self.view_timeout_ms < self.tick_ms:
            yield "protocol.view_timeout_ms must be at least one tick (tick_ms)"
        if not 1 <= self.chunk_bytes <= MAX_CHUNK_BYTES:
            yield f"protocol.chunk_bytes must be in [1, {MAX_CHUNK_BYTES}], got {self.chunk_bytes}"
        if self.max_stream_bytes < self.chunk_bytes:
            yield "protocol.max_stream_bytes must be at least chunk_bytes"
        if self.tls_ca_sha256 and not _SHA256_HEX.fullmatch(self.tls_ca_sha256):
            yield "protocol.tls_ca_sha256 must be 64 lowercase hex digits, or empty (no TLS)"
        if self.selection_seed not in SELECTION_SEEDS:
            yield (
                f"protocol.selection_seed must be {' or '.join(map(repr, SELECTION_SEEDS))}, "
                f"got {self.selection_seed!r}"
            )

    @property
    def view_timeout_ticks(self) -> int:
        """``Replica(timeout=...)``: the view timeout in ticks, rounded up."""
        return math.ceil(self.view_timeout_ms / self.tick_ms)


@dataclass(frozen=True)
class SelectionWeights:
    """Algorithm 1's weights; the defaults are ``fl.selection``'s."""

    w1: float = 0.4
    w2: float = 0.3
    w3: float = 0.3
    w4: float = 0.5
    w5: float = 0.5

    def problems(self) -> Iterator[str]:
        values = asdict(self)
        for name, value in values.items():
            if not (value >= 0 and math.isfinite(value)):
                yield f"selection.{name} must be a finite number >= 0, got {value}"
        if all(math.isfinite(v) for v in values.values()):
            if self.w1 + self.w2 + self.w3 <= 0:
                yield "selection.w1 + w2 + w3 must be positive"
            if self.w4 + self.w5 <= 0:
                yield "selection.w4 + w5 must be positive"

    @property
    def self_assessment(self) -> tuple[float, float, float]:
        return (self.w1, self.w2, self.w3)


@dataclass(frozen=True)
class Genesis:
    """A validated network description; construct through :meth:`from_dict` or the readers."""

    protocol: ProtocolParams
    selection: SelectionWeights
    run: RunConfig
    nodes: tuple[NodeInfo, ...]

    def __post_init__(self) -> None:
        problems = [
            *self.protocol.problems(),
            *self.selection.problems(),
            *node_problems(self.nodes, miners=self.protocol.miners, clients=self.run.clients),
        ]
        if self.run.reproducible_noise and not self.protocol.testbed:
            problems.append(
                "run.reproducible_noise makes every client's DP noise public; it is allowed "
                "only on a testbed (protocol.testbed = true)"
            )
        if problems:
            raise GenesisError("invalid genesis: " + "; ".join(problems))

    @cached_property
    def membership(self) -> Membership:
        return Membership(self.nodes)

    def to_dict(self) -> dict[str, Any]:
        run = {k: v for k, v in self.run.to_dict().items() if v is not None}
        return {
            "version": GENESIS_VERSION,
            "protocol": asdict(self.protocol),
            "selection": asdict(self.selection),
            "run": run,
            "nodes": [n.to_dict() for n in self.nodes],
        }

    @cached_property
    def digest(self) -> bytes:
        """SHA-256 of canonical JSON of :meth:`to_dict` (sorted keys): the network's id."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(b"LLBCFL/genesis/v1\x00" + canonical.encode("utf-8")).digest()

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> Genesis:
        check_keys(
            "genesis", doc, required={"version", "protocol", "run", "nodes"}, optional={"selection"}
        )
        if doc["version"] != GENESIS_VERSION:
            raise GenesisError(
                f"genesis version {doc['version']!r} is not supported (expected {GENESIS_VERSION})"
            )
        protocol = ProtocolParams(**_typed_table("protocol", doc["protocol"], ProtocolParams))
        selection = SelectionWeights(
            **_typed_table("selection", doc.get("selection", {}), SelectionWeights)
        )
        try:
            run = RunConfig(**_typed_table("run", doc["run"], RunConfig))
        except ValueError as exc:
            raise GenesisError(f"invalid [run]: {exc}") from exc
        raw_nodes = doc["nodes"]
        if not isinstance(raw_nodes, list):
            raise GenesisError("nodes must be an array of tables ([[nodes]])")
        nodes = tuple(node_from_dict(i, raw) for i, raw in enumerate(raw_nodes))
        return cls(protocol=protocol, selection=selection, run=run, nodes=nodes)


def read_genesis(path: Path) -> Genesis:
    """Load and validate ``path``; :class:`GenesisError` with a plain message on any defect."""
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise GenesisError(f"cannot read {path}: {exc.strerror}") from exc
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise GenesisError(f"{path} is not valid TOML: {exc}") from exc
    try:
        return Genesis.from_dict(doc)
    except GenesisError as exc:
        raise GenesisError(f"{path}: {exc}") from exc


def write_genesis(genesis: Genesis, path: Path) -> None:
    """Write ``genesis`` as TOML (atomically; world-readable, it holds no secret)."""
    from node.durable import write_durably

    header = "# LL-BCFL network genesis: every node of the network reads this file.\n"
    text = header + tomli_w.dumps(genesis.to_dict())
    write_durably(Path(path), text.encode("utf-8"), mode=0o644)


# Validation --------------------------------------------------------------


def _typed_table(where: str, table: Any, cls: type) -> dict[str, Any]:
    """``table`` checked against the dataclass ``cls``: known keys, values of the right type."""
    annotations = {f.name: str(f.type) for f in fields(cls)}
    check_keys(where, table, required=set(), optional=set(annotations))
    for key, value in table.items():
        expected = annotations[key].replace(" | None", "")
        if not _has_type(value, expected):
            raise GenesisError(f"{where}.{key} must be {expected}, got {value!r}")
    return dict(table)


def _has_type(value: Any, expected: str) -> bool:
    if expected == "bool":
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if expected == "int":
        return isinstance(value, int)
    if expected == "float":
        return isinstance(value, (int, float))
    if expected == "str":
        return isinstance(value, str)
    raise AssertionError(f"unhandled field type {expected}")  # a new RunConfig field type


# Network init ------------------------------------------------------------


def node_ids(*, miners: int, clients: int) -> list[tuple[str, str]]:
    """``(id, role)`` of every node in genesis order: server, miners, clients."""
    width = max(3, len(str(clients - 1)))
    return [
        ("server", "server"),
        *((f"miner-{i}", "miner") for i in range(miners)),
        *((f"client-{i:0{width}d}", "client") for i in range(clients)),
    ]


def load_host_map(path: Path) -> dict[str, str]:
    """A TOML (or, for ``*.json``, JSON) table: node id, role or ``default`` -> host[:port]."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        doc = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except OSError as exc:
        raise GenesisError(f"cannot read host map {path}: {exc.strerror}") from exc
    except (UnicodeDecodeError, ValueError) as exc:  # TOMLDecodeError is a ValueError
        raise GenesisError(f"host map {path} is not valid: {exc}") from exc
    if not isinstance(doc, dict) or not all(isinstance(v, str) for v in doc.values()):
        raise GenesisError(f"host map {path} must map node ids or roles to host strings")
    return doc


def id_range(key: str, ids: Sequence[str]) -> list[str] | None:
    """The node ids a host-map key ``first..last`` spans, in order (None: not a range).

    Both ends must be node ids of the network, of the same role and prefix
    (``client-000..client-003``), the first not after the last.
    """
    first, sep, last = key.partition("..")
    if not sep:
        return None
    if first not in ids or last not in ids:
        raise GenesisError(f"host map range {key!r}: both ends must be node ids of this network")
    start, stop = ids.index(first), ids.index(last)
    if first.rstrip("0123456789") != last.rstrip("0123456789") or start > stop:
        raise GenesisError(f"host map range {key!r} must run from a node id to a later one")
    return list(ids[start : stop + 1])


def plan_addresses(
    nodes: list[tuple[str, str]], *, hosts: Mapping[str, str], base_port: int
) -> dict[str, str]:
    """Address per node id: its host from ``hosts`` (by id, then a ``first..last`` range
    of ids, then role, then ``default``, else 127.0.0.1) and, unless the entry gives a
    port, the next port from ``base_port``. A client gets its host only: it dials
    out and listens on no port."""
    ids = [node_id for node_id, _ in nodes]
    by_range: dict[str, str] = {}
    for key, host in hosts.items():
        for node_id in id_range(key, ids) or []:
            if node_id in by_range:
                raise GenesisError(f"host map ranges overlap at {node_id}")
            by_range[node_id] = host
    known = set(ids) | set(ROLES) | {"default"}
    unknown = sorted(k for k in set(hosts) - known if ".." not in k)
    if unknown:
        raise GenesisError(f"host map names unknown nodes or roles: {', '.join(unknown)}")
    addresses: dict[str, str] = {}
    port = base_port
    for node_id, role in nodes:
        host = (
            hosts.get(node_id)
            or by_range.get(node_id)
            or hosts.get(role)
            or hosts.get("default")
            or "127.0.0.1"
        )
        if role == "client":  # listens on nothing: its host only
            try:
                addresses[node_id] = check_client_host(host)
            except ValueError as exc:
                raise GenesisError(f"host map, {node_id}: {exc}") from None
            continue
        try:
            split_address(host)
            addresses[node_id] = host  # the entry gives its own port
            continue
        except ValueError:
            pass
        if not 1 <= port <= 65535:
            raise GenesisError(f"ran out of ports: {node_id} would get port {port}")
        shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
        addresses[node_id] = f"{shown}:{port}"
        port += 1
    return addresses


def init_network(
    out_dir: Path,
    *,
    run: RunConfig,
    miners: int = 4,
    base_port: int = DEFAULT_BASE_PORT,
    hosts: Mapping[str, str] | None = None,
    protocol: ProtocolParams | None = None,
    force: bool = False,
    tls: bool = True,
) -> Genesis:
    """Write ``out_dir/genesis.toml`` and ``out_dir/keys/<id>.key`` (0600) for a new network,
    and with ``tls`` its CA and every node's certificate under ``out_dir/tls`` (``node.tls``).

    Keys come from ``os.urandom``. Nothing is written unless the whole
    genesis validates; the genesis is written last, so its presence means
    the keys are complete. An existing genesis is replaced only with
    ``force``, and then stale ``*.key`` files in ``keys/`` are removed.
    """
    from node.identity import Identity, save_identity

    if miners < 4 or (miners - 1) % 3:
        raise GenesisError(f"--miners must be 3f+1 with f >= 1 (4, 7, 10, ...), got {miners}")
    out_dir = Path(out_dir)
    genesis_path = out_dir / GENESIS_FILE
    if genesis_path.exists() and not force:
        raise GenesisError(f"{genesis_path} exists; pass --force to replace it and its keys")
    plan = node_ids(miners=miners, clients=run.clients)
    addresses = plan_addresses(plan, hosts=hosts or {}, base_port=base_port)
    identities = [Identity.generate(node_id=node_id, role=role) for node_id, role in plan]
    replicas = iter(range(miners))
    client_indices = iter(range(run.clients))
    nodes = tuple(
        NodeInfo(
            node_id=ident.node_id,
            role=ident.role,
            address=addresses[ident.node_id],
            public_key=ident.public_key,
            replica=next(replicas) if ident.role == "miner" else None,
            client_index=next(client_indices) if ident.role == "client" else None,
        )
        for ident in identities
    )
    base = protocol or ProtocolParams()
    params = ProtocolParams(
        **{**asdict(base), "f": (miners - 1) // 3, "miners": miners, "tls_ca_sha256": ""}
    )
    genesis = Genesis(protocol=params, selection=SelectionWeights(), run=run, nodes=nodes)

    keys_dir = out_dir / KEYS_DIR
    keys_dir.mkdir(parents=True, exist_ok=True)
    keys_dir.chmod(0o700)
    wanted = {f"{ident.node_id}.key" for ident in identities}
    for stale in keys_dir.glob("*.key"):
        if stale.name not in wanted:
            stale.unlink()
    for ident in identities:
        save_identity(ident, key_path(out_dir, ident.node_id))
    if tls:
        from node.tls import write_network_tls

        digest = write_network_tls(out_dir, [i.node_id for i in identities], label=out_dir.name)
        genesis = replace(genesis, protocol=replace(params, tls_ca_sha256=digest))
    write_genesis(genesis, genesis_path)
    return genesis


def key_path(network_dir: Path, node_id: str) -> Path:
    """Where ``network init`` puts ``node_id``'s key file."""
    return Path(network_dir) / KEYS_DIR / f"{node_id}.key"
