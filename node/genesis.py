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
                 DP noise allowed)
    [selection]  w1, w2, w3 (self-assessment), w4, w5 (self vs reputation)
    [run]        RunConfig fields (unset optional fields are omitted)
    [[nodes]]    id, role, address "host:port", public_key (hex),
                 replica (miners: 0..n-1), client_index (clients: 0..K-1)
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
from collections.abc import Iterable, Iterator, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import asdict, dataclass, fields
from functools import cached_property
from pathlib import Path
from typing import Any, Final

import tomli_w

from chain.records import SELECTION_SEEDS
from fl.config import RunConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

GENESIS_VERSION: Final = 1
GENESIS_FILE: Final = "genesis.toml"
KEYS_DIR: Final = "keys"
ROLES: Final = ("client", "miner", "server")
MAX_CHUNK_BYTES: Final = 1 << 20
DEFAULT_BASE_PORT: Final = 50051
_NODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_PUBLIC_KEY = re.compile(r"[0-9a-f]{64}")


class GenesisError(Exception):
    """A genesis file (or network-init request) that is not usable; the message says why."""


@dataclass(frozen=True)
class ProtocolParams:
    """Consensus and transport parameters shared by every node."""

    f: int = 1
    miners: int = 4
    tick_ms: int = 50
    view_timeout_ms: int = 1000
    round_deadline_ms: int = 300_000
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
class NodeInfo:
    """One member of the network as the genesis lists it."""

    node_id: str
    role: str
    address: str
    public_key: bytes
    replica: int | None = None
    client_index: int | None = None

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "id": self.node_id,
            "role": self.role,
            "address": self.address,
            "public_key": self.public_key.hex(),
        }
        if self.replica is not None:
            doc["replica"] = self.replica
        if self.client_index is not None:
            doc["client_index"] = self.client_index
        return doc


class Membership:
    """The nodes of one network, looked up by id, public key, replica or client index."""

    def __init__(self, nodes: Iterable[NodeInfo]) -> None:
        self.nodes = tuple(nodes)
        self._by_id = {n.node_id: n for n in self.nodes}
        self._by_key = {n.public_key: n for n in self.nodes}
        if len(self._by_id) != len(self.nodes) or len(self._by_key) != len(self.nodes):
            raise GenesisError("node ids and public keys must be unique")
        by_role = {role: [n for n in self.nodes if n.role == role] for role in ROLES}
        self.miners = tuple(sorted(by_role["miner"], key=lambda n: n.replica or 0))
        self.clients = tuple(sorted(by_role["client"], key=lambda n: n.client_index or 0))
        self.servers = tuple(by_role["server"])

    def get(self, node_id: str) -> NodeInfo | None:
        return self._by_id.get(node_id)

    def __getitem__(self, node_id: str) -> NodeInfo:
        return self._by_id[node_id]

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._by_id

    def __iter__(self) -> Iterator[NodeInfo]:
        return iter(self.nodes)

    def __len__(self) -> int:
        return len(self.nodes)

    def by_public_key(self, public_key: bytes) -> NodeInfo | None:
        return self._by_key.get(bytes(public_key))

    @property
    def server(self) -> NodeInfo:
        if len(self.servers) != 1:
            raise GenesisError(f"the network needs exactly one server, has {len(self.servers)}")
        return self.servers[0]

    def miner(self, replica: int) -> NodeInfo:
        """The miner with replica index ``replica`` (0..n-1)."""
        return self.miners[replica]


@dataclass(frozen=True)
class Genesis:
    """A validated network description; construct through :meth:`from_dict` or the readers."""

    protocol: ProtocolParams
    selection: SelectionWeights
    run: RunConfig
    nodes: tuple[NodeInfo, ...]

    def __post_init__(self) -> None:
        problems = [*self.protocol.problems(), *self.selection.problems(), *_node_problems(self)]
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
        _check_keys(
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
        nodes = tuple(_node_from_dict(i, raw) for i, raw in enumerate(raw_nodes))
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


def _check_keys(
    where: str, table: Any, *, required: AbstractSet[str], optional: AbstractSet[str] = frozenset()
) -> None:
    if not isinstance(table, Mapping):
        raise GenesisError(f"{where} must be a table")
    missing = sorted(required - set(table))
    if missing:
        raise GenesisError(f"{where} lacks {', '.join(missing)}")
    unknown = sorted(set(table) - required - optional)
    if unknown:
        raise GenesisError(f"{where} has unknown key(s): {', '.join(unknown)}")


def _typed_table(where: str, table: Any, cls: type) -> dict[str, Any]:
    """``table`` checked against the dataclass ``cls``: known keys, values of the right type."""
    annotations = {f.name: str(f.type) for f in fields(cls)}
    _check_keys(where, table, required=set(), optional=set(annotations))
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


def _node_from_dict(index: int, raw: Any) -> NodeInfo:
    where = f"nodes[{index}]"
    _check_keys(
        where,
        raw,
        required={"id", "role", "address", "public_key"},
        optional={"replica", "client_index"},
    )
    for key in ("id", "role", "address", "public_key"):
        if not isinstance(raw[key], str):
            raise GenesisError(f"{where}.{key} must be a string, got {raw[key]!r}")
    for key in ("replica", "client_index"):
        if key in raw and (isinstance(raw[key], bool) or not isinstance(raw[key], int)):
            raise GenesisError(f"{where}.{key} must be an integer, got {raw[key]!r}")
    if not _PUBLIC_KEY.fullmatch(raw["public_key"]):
        raise GenesisError(
            f"{where} ({raw['id']}): public_key must be 64 lowercase hex digits "
            f"(32 bytes), got {raw['public_key']!r}"
        )
    return NodeInfo(
        node_id=raw["id"],
        role=raw["role"],
        address=raw["address"],
        public_key=bytes.fromhex(raw["public_key"]),
        replica=raw.get("replica"),
        client_index=raw.get("client_index"),
    )


def split_address(address: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` to (host, port); ValueError when malformed."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"address must be host:port with port 1..65535, got {address!r}")
    if host.startswith("[") != host.endswith("]") or (":" in host and not host.startswith("[")):
        raise ValueError(f"write IPv6 addresses as [host]:port, got {address!r}")
    return host, int(port)


def _node_problems(genesis: Genesis) -> Iterator[str]:
    nodes = genesis.nodes
    for label, key in (
        ("id", lambda n: n.node_id),
        ("public key", lambda n: n.public_key),
        ("address", lambda n: n.address),
    ):
        yield from _duplicates(label, [key(n) for n in nodes])
    for n in nodes:
        if not _NODE_ID.fullmatch(n.node_id):
            yield f"node id {n.node_id!r} must be 1-64 letters, digits, '.', '_' or '-'"
        if n.role not in ROLES:
            yield f"{n.node_id}: role must be one of {', '.join(ROLES)}, got {n.role!r}"
        try:
            split_address(n.address)
        except ValueError as exc:
            yield f"{n.node_id}: {exc}"
        if n.replica is not None and n.role != "miner":
            yield f"{n.node_id}: only miners have a replica index"
        if n.client_index is not None and n.role != "client":
            yield f"{n.node_id}: only clients have a client_index"
    yield from _index_problems(
        "miner", "replica", [n.replica for n in nodes if n.role == "miner"], genesis.protocol.miners
    )
    yield from _index_problems(
        "client",
        "client_index",
        [n.client_index for n in nodes if n.role == "client"],
        genesis.run.clients,
    )
    servers = [n.node_id for n in nodes if n.role == "server"]
    if len(servers) != 1:
        yield f"the network needs exactly one server, has {len(servers)}"


def _duplicates(label: str, values: list[Any]) -> Iterator[str]:
    seen: set[Any] = set()
    for value in values:
        if value in seen:
            shown = value.hex() if isinstance(value, bytes) else value
            yield f"duplicate {label} {shown}"
        seen.add(value)


def _index_problems(role: str, key: str, indices: list[int | None], expected: int) -> Iterator[str]:
    if len(indices) != expected:
        yield f"expected {expected} {role}s, found {len(indices)}"
    if sorted(i for i in indices if i is not None) != list(range(len(indices))):
        yield f"{role} {key} values must be exactly 0..{len(indices) - 1}, got {indices}"


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


def plan_addresses(
    nodes: list[tuple[str, str]], *, hosts: Mapping[str, str], base_port: int
) -> dict[str, str]:
    """Address per node id: its host from ``hosts`` (by id, then role, then ``default``,
    else 127.0.0.1) and, unless the entry gives a port, the next port from ``base_port``."""
    known = {node_id for node_id, _ in nodes} | set(ROLES) | {"default"}
    unknown = sorted(set(hosts) - known)
    if unknown:
        raise GenesisError(f"host map names unknown nodes or roles: {', '.join(unknown)}")
    addresses: dict[str, str] = {}
    port = base_port
    for node_id, role in nodes:
        host = hosts.get(node_id) or hosts.get(role) or hosts.get("default") or "127.0.0.1"
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
) -> Genesis:
    """Write ``out_dir/genesis.toml`` and ``out_dir/keys/<id>.key`` (0600) for a new network.

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
    params = ProtocolParams(**{**asdict(base), "f": (miners - 1) // 3, "miners": miners})
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
    write_genesis(genesis, genesis_path)
    return genesis


def key_path(network_dir: Path, node_id: str) -> Path:
    """Where ``network init`` puts ``node_id``'s key file."""
    return Path(network_dir) / KEYS_DIR / f"{node_id}.key"
