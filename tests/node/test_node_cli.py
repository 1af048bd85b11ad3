"""``cli.py node`` and ``chain`` refuse bad configuration with a plain message."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from cli import main
from fl.config import RunConfig
from node.genesis import init_network, key_path


def network(tmp_path: Path) -> Path:
    init_network(tmp_path, run=RunConfig(clients=2, frac=0.5, model="mlp"), base_port=41000)
    return tmp_path


def test_node_refuses_a_key_of_another_role(tmp_path: Path) -> None:
    net = network(tmp_path)
    genesis, key = str(net / "genesis.toml"), str(key_path(net, "client-000"))
    result = CliRunner().invoke(
        main, ["node", "--role", "miner", "--genesis", genesis, "--key", key]
    )
    assert result.exit_code == 1
    assert "keys of other roles given to a miner: client-000" in result.output


def test_node_refuses_a_key_outside_the_genesis(tmp_path: Path) -> None:
    first = network(tmp_path / "a")
    second = network(tmp_path / "b")
    genesis, key = str(first / "genesis.toml"), str(key_path(second, "server"))
    result = CliRunner().invoke(
        main, ["node", "--role", "server", "--genesis", genesis, "--key", key]
    )
    assert result.exit_code == 1
    assert "key is not in" in result.output


def test_chain_verify_of_a_non_database_is_a_plain_error(tmp_path: Path) -> None:
    net = network(tmp_path)
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not sqlite at all, just bytes" * 10)
    result = CliRunner().invoke(
        main, ["chain", "verify", "--db", str(junk), "--genesis", str(net / "genesis.toml")]
    )
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert "chain database" in result.output
