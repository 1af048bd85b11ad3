"""The members of a network as the genesis lists them: who, which role, where, which key.

:class:`Membership` looks nodes up by id, public key, replica or client
index; :func:`node_from_dict` reads one ``[[nodes]]`` entry and
:func:`node_problems` checks a node list (unique ids, keys and addresses,
roles, addresses, replica and client indices). A server's or miner's
address is the ``host:port`` it listens on; a client's is only the host it
runs on (clients dial out and listen on nothing; bundles group by host). Loading a genesis
(``node.genesis``) uses both.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any, Final

ROLES: Final = ("client", "miner", "server")
_NODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_PUBLIC_KEY = re.compile(r"[0-9a-f]{64}")


class GenesisError(Exception):
    """A genesis file (or network-init request) that is not usable; the message says why."""


@dataclass(frozen=True)
class NodeInfo:
    """One member of the network as the genesis lists it."""

    node_id: str
    role: str
    address: str  # server, miners: "host:port" they listen on; clients: their host
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


def check_keys(
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


def node_from_dict(index: int, raw: Any) -> NodeInfo:
    where = f"nodes[{index}]"
    check_keys(
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


_HOST = re.compile(r"[A-Za-z0-9._-]{1,253}|\[?[0-9A-Fa-f:.]{2,45}\]?")


def check_client_host(host: str) -> str:
    """A client's host (a name or an IP, no port: clients listen on nothing), else ValueError."""
    try:
        split_address(host)
    except ValueError:
        pass
    else:
        if not host.count(":") > 1 or host.startswith("["):
            raise ValueError(f"a client listens on no port: give a host without one, got {host!r}")
    if not _HOST.fullmatch(host):
        raise ValueError(f"a client's address must be a host name or IP, got {host!r}")
    return host.strip("[]")


def node_problems(nodes: Iterable[NodeInfo], *, miners: int, clients: int) -> Iterator[str]:
    """What is wrong with a network's node list (ids, roles, addresses, indices)."""
    nodes = tuple(nodes)
    for label, key in (
        ("id", lambda n: n.node_id),
        ("public key", lambda n: n.public_key),
    ):
        yield from _duplicates(label, [key(n) for n in nodes])
    yield from _duplicates("address", [n.address for n in nodes if n.role != "client"])
    for n in nodes:
        if not _NODE_ID.fullmatch(n.node_id):
            yield f"node id {n.node_id!r} must be 1-64 letters, digits, '.', '_' or '-'"
        if n.role not in ROLES:
            yield f"{n.node_id}: role must be one of {', '.join(ROLES)}, got {n.role!r}"
        try:
            (check_client_host if n.role == "client" else split_address)(n.address)
        except ValueError as exc:
            yield f"{n.node_id}: {exc}"
        if n.replica is not None and n.role != "miner":
            yield f"{n.node_id}: only miners have a replica index"
        if n.client_index is not None and n.role != "client":
            yield f"{n.node_id}: only clients have a client_index"
    yield from _index_problems(
        "miner", "replica", [n.replica for n in nodes if n.role == "miner"], miners
    )
    yield from _index_problems(
        "client",
        "client_index",
        [n.client_index for n in nodes if n.role == "client"],
        clients,
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
