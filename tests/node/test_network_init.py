"""`network init`: genesis and key files on disk, refusals as plain errors."""

from __future__ import annotations

import stat
import sys
from dataclasses import fields

import pytest
from click.testing import CliRunner

import cli
from fl.config import RunConfig
from node.genesis import key_path, read_genesis
from node.identity import load_identity
from tests.run_configs import changed_config, cli_args

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib


def init(*args):
    return CliRunner().invoke(cli.main, ["network", "init", *args])


def test_writes_genesis_and_one_private_key_per_node(tmp_path):
    # Prepare
    out = tmp_path / "net"
    # Execute
    result = init("--out", str(out), "--clients", "12", "--rounds", "7", "--dp", "gaussian")
    # Assert
    assert result.exit_code == 0, result.output
    genesis = read_genesis(out / "genesis.toml")
    assert (genesis.run.clients, genesis.run.rounds, genesis.run.dp) == (12, 7, "gaussian")
    assert [n.node_id for n in genesis.membership.miners] == [f"miner-{i}" for i in range(4)]
    assert genesis.membership.clients[7].node_id == "client-007"
    assert genesis.membership.server.address == "127.0.0.1:50051"
    for node in genesis.nodes:
        path = key_path(out, node.node_id)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert load_identity(path).public_key == node.public_key
    assert stat.S_IMODE((out / "keys").stat().st_mode) == 0o700
    assert "4 miners (f = 1), 12 clients" in result.output


def test_every_run_option_given_reaches_the_genesis(tmp_path):
    # Prepare: every field off its default (a testbed, for --reproducible-noise)
    config = changed_config(clients=3)
    out = tmp_path / "net"
    # Execute
    result = init("--out", str(out), "--testbed", *cli_args(config))
    # Assert: the [run] table holds every field, and reads back as the config
    assert result.exit_code == 0, result.output
    doc = tomllib.loads((out / "genesis.toml").read_text())
    assert set(doc["run"]) == {f.name for f in fields(RunConfig)}
    assert read_genesis(out / "genesis.toml").run == config


@pytest.mark.parametrize(
    ("args", "expected"), [((), "block"), (("--selection-seed", "run"), "run")]
)
def test_selection_seed_goes_into_the_genesis(tmp_path, args, expected):
    # Execute
    result = init("--out", str(tmp_path / "net"), "--clients", "3", *args)
    # Assert
    assert result.exit_code == 0, result.output
    assert read_genesis(tmp_path / "net" / "genesis.toml").protocol.selection_seed == expected


def test_refuses_to_overwrite_without_force(tmp_path):
    # Prepare
    out = tmp_path / "net"
    assert init("--out", str(out), "--clients", "3").exit_code == 0
    before = (out / "genesis.toml").read_bytes()
    # Execute
    result = init("--out", str(out), "--clients", "3")
    # Assert
    assert result.exit_code == 1
    assert "exists; pass --force" in result.output
    assert (out / "genesis.toml").read_bytes() == before


def test_force_replaces_genesis_and_removes_stale_keys(tmp_path):
    # Prepare
    out = tmp_path / "net"
    assert init("--out", str(out), "--clients", "5").exit_code == 0
    old_key = load_identity(key_path(out, "server")).public_key
    # Execute
    result = init("--out", str(out), "--clients", "2", "--force")
    # Assert
    assert result.exit_code == 0, result.output
    assert load_identity(key_path(out, "server")).public_key != old_key
    assert sorted(p.stem for p in (out / "keys").iterdir() if p.stem.startswith("client")) == [
        "client-000",
        "client-001",
    ]


def test_host_map_places_nodes(tmp_path):
    # Prepare
    hosts = tmp_path / "hosts.toml"
    hosts.write_text('miner = "10.0.0.2"\n"client-001" = "10.0.0.9"\n"server" = "10.0.0.1:9000"\n')
    out = tmp_path / "net"
    # Execute
    result = init(
        "--out", str(out), "--clients", "2", "--host-map", str(hosts), "--base-port", "6000"
    )
    # Assert
    assert result.exit_code == 0, result.output
    members = read_genesis(out / "genesis.toml").membership
    assert members.server.address == "10.0.0.1:9000"
    assert [m.address for m in members.miners] == [f"10.0.0.2:{p}" for p in range(6000, 6004)]
    # Clients dial out: their host only, no port
    assert members["client-000"].address == "127.0.0.1"
    assert members["client-001"].address == "10.0.0.9"


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--miners", "5"], 1, "--miners must be 3f+1"),
        (["--miners", "1"], 1, "--miners must be 3f+1"),
        (["--clients", "0"], 2, "--clients must be >= 1"),
        (["--base-port", "70000"], 1, "ran out of ports"),
        (["--selection-seed", "hash"], 2, "'hash' is not one of 'block', 'run'"),
    ],
)
def test_bad_input_is_a_plain_one_line_error(tmp_path, args, code, message):
    # Execute
    result = init("--out", str(tmp_path / "net"), "--clients", "3", *args)
    # Assert
    assert result.exit_code == code
    assert message in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "net" / "genesis.toml").exists()


def test_bad_host_map_is_a_plain_error(tmp_path):
    # Prepare
    hosts = tmp_path / "hosts.toml"
    hosts.write_text('minre = "10.0.0.2"\n')
    # Execute
    result = init("--out", str(tmp_path / "net"), "--clients", "3", "--host-map", str(hosts))
    # Assert
    assert result.exit_code == 1
    assert "unknown nodes or roles: minre" in result.output


def test_help_lists_network_and_run_options():
    # Execute
    result = CliRunner().invoke(cli.main, ["network", "init", "--help"])
    # Assert
    assert result.exit_code == 0
    for option in (
        "--out",
        "--miners",
        "--host-map",
        "--base-port",
        "--force",
        "--selection-seed",
        "--clients",
        "--dp",
    ):
        assert option in result.output
