"""A small fixed network for node tests: server, four miners, three clients.

Keys come from fixed seeds (SHA-256 of the node id), so every run signs the
same bytes.
"""

from __future__ import annotations

import hashlib

import pytest

from fl.config import RunConfig
from node.genesis import Genesis, Membership, NodeInfo, ProtocolParams, SelectionWeights
from node.identity import Identity

NODES = [
    ("server", "server"),
    ("miner-0", "miner"),
    ("miner-1", "miner"),
    ("miner-2", "miner"),
    ("miner-3", "miner"),
    ("client-000", "client"),
    ("client-001", "client"),
    ("client-002", "client"),
]


def fixed_identity(node_id: str, role: str) -> Identity:
    return Identity.generate(
        node_id=node_id, role=role, seed=hashlib.sha256(node_id.encode()).digest()
    )


@pytest.fixture(scope="session")
def identities() -> dict[str, Identity]:
    return {node_id: fixed_identity(node_id, role) for node_id, role in NODES}


def network_genesis(run: RunConfig) -> Genesis:
    """The fixed network (``NODES``, keys from fixed seeds) running ``run``."""
    nodes = []
    for port, (node_id, role) in enumerate(NODES, start=50051):
        number = int(node_id.rsplit("-", 1)[1]) if "-" in node_id else None
        nodes.append(
            NodeInfo(
                node_id=node_id,
                role=role,
                address="127.0.0.1" if role == "client" else f"127.0.0.1:{port}",
                public_key=fixed_identity(node_id, role).public_key,
                replica=number if role == "miner" else None,
                client_index=number if role == "client" else None,
            )
        )
    return Genesis(
        protocol=ProtocolParams(), selection=SelectionWeights(), run=run, nodes=tuple(nodes)
    )


@pytest.fixture(scope="session")
def genesis(identities: dict[str, Identity]) -> Genesis:
    return network_genesis(RunConfig(clients=3))


@pytest.fixture(scope="session")
def membership(genesis: Genesis) -> Membership:
    return genesis.membership
