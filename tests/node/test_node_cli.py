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


def test_a_node_keeps_its_state_per_network_and_node_under_the_users_state_folder(
    tmp_path, monkeypatch
):
    # Prepare
    from node.roles import default_ledger_path, default_state_dir

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    # Execute
    miner = default_state_dir(b"\xab" * 32, "miner-0")
    other_network = default_state_dir(b"\xcd" * 32, "miner-0")
    # Assert: not under the working directory; one folder per network and node
    assert miner == tmp_path / "llbcfl" / "networks" / ("ab" * 8) / "miner-0"
    assert other_network != miner
    assert default_ledger_path() == tmp_path / "llbcfl" / "privacy-ledger.json"
