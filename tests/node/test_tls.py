"""Mutual TLS (node.tls, node.serving.Transport): files, checks, and live calls.

A real ``serve()`` endpoint listens on 127.0.0.1 with miner-0's certificate
of a network made by ``init_network``; callers dial it with certificates of
that network (a client, the server), of another network, or none.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest

from commands.launcher import free_ports
from fl.config import RunConfig
from node.genesis import Genesis, init_network
from node.membership import Membership
from node.roles import transport_for
from node.serving import (
    CHANNEL_OPTIONS,
    Endpoint,
    StatusInfo,
    Transport,
    channel,
    serve,
    use_transport,
)
from node.tls import CA_KEY, TLS_DIR, TlsError, load_node_tls, node_files, reissue
from proto import llbcfl_pb2 as pb
from proto import llbcfl_pb2_grpc as pb_grpc


@pytest.fixture(autouse=True)
def plaintext_after() -> Iterator[None]:
    yield
    use_transport(None)  # the transport is process-wide: leave none behind


def network(folder: Path, port: int) -> Genesis:
    hosts = {"miner-0": f"127.0.0.1:{port}"}
    return init_network(folder, run=RunConfig(clients=2), hosts=hosts)


def tls_of(folder: Path, genesis: Genesis, node_id: str) -> Transport:
    transport = transport_for(genesis, node_id, folder / TLS_DIR)
    assert transport is not None
    return transport


def test_network_init_writes_a_ca_a_key_and_a_certificate_per_node_0600(tmp_path: Path) -> None:
    # Execute
    genesis = network(tmp_path, 50100)
    # Assert: the genesis names the CA; every node has its files, keys 0600
    tls = tmp_path / TLS_DIR
    assert len(genesis.protocol.tls_ca_sha256) == 64
    assert tls.stat().st_mode & 0o777 == 0o700
    assert (tls / CA_KEY).stat().st_mode & 0o777 == 0o600
    assert (tls / "ca.pem").stat().st_mode & 0o777 == 0o600
    for node in genesis.nodes:
        cert, key = node_files(tls, node.node_id)
        assert key.stat().st_mode & 0o777 == 0o600
        assert cert.stat().st_mode & 0o777 == 0o600
        loaded = load_node_tls(tls, node.node_id, expected_ca=genesis.protocol.tls_ca_sha256)
        assert loaded.cert == cert.read_bytes()


def test_network_init_insecure_names_no_ca(tmp_path: Path) -> None:
    genesis = init_network(tmp_path, run=RunConfig(clients=2), tls=False)
    assert genesis.protocol.tls_ca_sha256 == ""
    assert not (tmp_path / TLS_DIR).exists()
    assert transport_for(genesis, "server", tmp_path / TLS_DIR) is None


def test_tls_files_that_are_not_this_nodes_or_this_networks_are_refused(tmp_path: Path) -> None:
    # Prepare: two networks
    ours = network(tmp_path / "a", 50100)
    network(tmp_path / "b", 50100)
    tls, other = tmp_path / "a" / TLS_DIR, tmp_path / "b" / TLS_DIR
    expected = ours.protocol.tls_ca_sha256
    # Execute / Assert: another network's folder (CA digest differs)
    with pytest.raises(TlsError, match="not this network's CA"):
        load_node_tls(other, "miner-0", expected_ca=expected)
    # ... another network's certificate under this node's name
    swapped = tmp_path / "swapped"
    swapped.mkdir()
    (swapped / "ca.pem").write_bytes((tls / "ca.pem").read_bytes())
    for path in node_files(other, "miner-0"):
        (swapped / path.name).write_bytes(path.read_bytes())
    (swapped / "miner-0.key").chmod(0o600)
    with pytest.raises(TlsError, match="not a certificate of this network's CA"):
        load_node_tls(swapped, "miner-0", expected_ca=expected)
    # ... another node's certificate
    with pytest.raises(TlsError, match="cannot read"):
        load_node_tls(tls, "miner-9", expected_ca=expected)
    (swapped / "miner-1.pem").write_bytes((tls / "miner-0.pem").read_bytes())
    (swapped / "miner-1.key").write_bytes((tls / "miner-0.key").read_bytes())
    (swapped / "miner-1.key").chmod(0o600)
    with pytest.raises(TlsError, match="not miner-1's certificate"):
        load_node_tls(swapped, "miner-1", expected_ca=expected)
    # ... a key others can read
    (tls / "miner-0.key").chmod(0o644)
    with pytest.raises(TlsError, match="readable by others"):
        load_node_tls(tls, "miner-0", expected_ca=expected)


class AttendOnly:
    """A Server service whose Attend yields nothing (what matters is who gets in)."""

    async def DownloadModel(self, request: Any, context: Any) -> Any:
        return
        yield  # pragma: no cover

    async def Attend(self, request: Any, context: Any) -> Any:
        return
        yield  # pragma: no cover


def call_miner_0(tmp_path: Path, dial: Any, *, services: dict[str, Any] | None = None) -> list[Any]:
    """Serve miner-0 (Node.Status, ``services``) with mutual TLS; ``await dial(address)``."""
    port = free_ports(1)[0]
    genesis = network(tmp_path / "net", port)
    use_transport(tls_of(tmp_path / "net", genesis, "miner-0"))
    address = f"127.0.0.1:{port}"
    endpoint = Endpoint(
        node_id="miner-0",
        role="miner",
        address=address,
        genesis_digest=genesis.digest,
        status=lambda: StatusInfo(0, 0),
        services=services or {},
    )
    results: list[Any] = []

    async def run() -> None:
        results.append(await dial(genesis, address))

    async def main() -> None:
        await serve([endpoint], stop=asyncio.Event(), run=run)

    asyncio.run(main())
    return results


async def status_code(ch: Any) -> grpc.StatusCode:
    try:
        await pb_grpc.NodeStub(ch).Status(pb.StatusRequest(), timeout=5)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def test_members_of_the_network_get_in_with_their_certificate(tmp_path: Path) -> None:
    async def dial(genesis: Genesis, address: str) -> Any:
        use_transport(tls_of(tmp_path / "net", genesis, "client-000"))
        async with channel(address) as ch:  # checks miner-0's certificate too
            return await status_code(ch)

    assert call_miner_0(tmp_path, dial) == [grpc.StatusCode.OK]


@pytest.mark.parametrize("caller", ["plaintext", "no certificate", "another network"])
def test_callers_without_a_certificate_of_this_network_cannot_connect(
    tmp_path: Path, caller: str
) -> None:
    # Prepare: a network whose client dials with its own CA and certificate
    other = init_network(tmp_path / "other", run=RunConfig(clients=2))
    outsider = tls_of(tmp_path / "other", other, "client-000")

    async def dial(genesis: Genesis, address: str) -> Any:
        ours = tls_of(tmp_path / "net", genesis, "client-000")
        target = [*CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", "miner-0")]
        if caller == "plaintext":
            ch = grpc.aio.insecure_channel(address)
        elif caller == "no certificate":  # trusts our CA, presents nothing
            creds = grpc.ssl_channel_credentials(root_certificates=ours.tls.ca)
            ch = grpc.aio.secure_channel(address, creds, options=target)
        else:  # trusts our CA, presents the other network's certificate
            creds = grpc.ssl_channel_credentials(
                root_certificates=ours.tls.ca,
                private_key=outsider.tls.key,
                certificate_chain=outsider.tls.cert,
            )
            ch = grpc.aio.secure_channel(address, creds, options=target)
        async with ch:
            return await status_code(ch)

    # Execute / Assert: the handshake fails; no method is reached
    assert call_miner_0(tmp_path, dial) == [grpc.StatusCode.UNAVAILABLE]


def test_a_node_at_an_address_the_genesis_gives_another_node_is_not_trusted(
    tmp_path: Path,
) -> None:
    # Prepare: the caller's genesis says miner-1 is at miner-0's address
    async def dial(genesis: Genesis, address: str) -> Any:
        ours = tls_of(tmp_path / "net", genesis, "client-000")
        moved = [
            replace(n, address=address if n.node_id == "miner-1" else f"127.0.0.1:{i + 1}")
            if n.role != "client"
            else n
            for i, n in enumerate(genesis.nodes)
        ]
        use_transport(Transport(ours.tls, Membership(moved)))
        async with channel(address) as ch:
            return await status_code(ch)

    # Execute / Assert: miner-0's certificate does not name miner-1
    assert call_miner_0(tmp_path, dial) == [grpc.StatusCode.UNAVAILABLE]


@pytest.mark.parametrize(
    ("caller", "code"),
    [
        ("client-000", grpc.StatusCode.OK),
        ("miner-1", grpc.StatusCode.PERMISSION_DENIED),
        ("server", grpc.StatusCode.PERMISSION_DENIED),
    ],
)
def test_each_method_admits_only_its_roles(tmp_path: Path, caller: str, code: Any) -> None:
    # Prepare: Server/Attend is for clients only
    async def dial(genesis: Genesis, address: str) -> Any:
        use_transport(tls_of(tmp_path / "net", genesis, caller))
        async with channel(address) as ch:
            try:
                async for _ in pb_grpc.ServerStub(ch).Attend(pb.AttendRequest(), timeout=5):
                    pass
            except grpc.aio.AioRpcError as exc:
                return exc.code()
            return grpc.StatusCode.OK

    # Execute / Assert
    assert call_miner_0(tmp_path, dial, services={"Server": AttendOnly()}) == [code]


def test_a_rotated_certificate_gets_in_and_the_old_key_is_replaced(tmp_path: Path) -> None:
    # Prepare: client-000's certificate re-issued (network certify)
    async def dial(genesis: Genesis, address: str) -> Any:
        folder = tmp_path / "net"
        old = (folder / TLS_DIR / "client-000.key").read_bytes()
        reissue(folder, "client-000")
        new = tls_of(folder, genesis, "client-000")
        use_transport(new)
        async with channel(address) as ch:
            return new.tls.key != old, await status_code(ch)

    # Execute / Assert
    assert call_miner_0(tmp_path, dial) == [(True, grpc.StatusCode.OK)]
