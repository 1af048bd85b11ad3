"""The network file: round trip, membership lookups, and every validation error."""

from __future__ import annotations

import copy
import inspect
import re
from dataclasses import fields

import pytest

from fl.config import RunConfig
from fl.selection import SelectionParams, self_assessment
from node.genesis import (
    Genesis,
    GenesisError,
    ProtocolParams,
    SelectionWeights,
    load_host_map,
    plan_addresses,
    read_genesis,
    split_address,
    write_genesis,
)
from tests.run_configs import changed_config


def test_every_run_option_round_trips_through_the_file(tmp_path, genesis):
    # Prepare: every run field off its default
    config = changed_config(clients=3)
    changed = Genesis(
        protocol=ProtocolParams(testbed=True),
        selection=genesis.selection,
        run=config,
        nodes=genesis.nodes,
    )
    path = tmp_path / "genesis.toml"
    # Execute
    write_genesis(changed, path)
    loaded = read_genesis(path)
    # Assert
    assert loaded.run == config
    assert loaded.digest == changed.digest
    assert set(changed.to_dict()["run"]) == {f.name for f in fields(RunConfig)}


def test_write_then_read_gives_the_same_genesis(tmp_path, genesis):
    # Prepare
    path = tmp_path / "genesis.toml"
    # Execute
    write_genesis(genesis, path)
    loaded = read_genesis(path)
    # Assert
    assert loaded == genesis
    assert loaded.digest == genesis.digest


@pytest.mark.parametrize("seed", ["block", "run"])
def test_selection_seed_round_trips_through_the_file(tmp_path, genesis, seed):
    # Prepare
    path = tmp_path / "genesis.toml"
    chosen = Genesis(
        protocol=ProtocolParams(selection_seed=seed),
        selection=genesis.selection,
        run=genesis.run,
        nodes=genesis.nodes,
    )
    # Execute
    write_genesis(chosen, path)
    loaded = read_genesis(path)
    # Assert
    assert f'selection_seed = "{seed}"' in path.read_text()
    assert loaded.protocol.selection_seed == seed
    assert loaded == chosen


def test_selection_seed_defaults_to_block_and_is_part_of_the_digest(genesis):
    # Prepare: a [protocol] table without the key
    doc = genesis.to_dict()
    del doc["protocol"]["selection_seed"]
    run_doc = copy.deepcopy(doc)
    run_doc["protocol"]["selection_seed"] = "run"
    # Execute
    implicit, run = Genesis.from_dict(doc), Genesis.from_dict(run_doc)
    # Assert
    assert implicit.protocol.selection_seed == "block"
    assert implicit.digest == genesis.digest
    assert run.digest != genesis.digest


def test_digest_changes_with_any_field(genesis):
    # Prepare
    doc = genesis.to_dict()
    doc["run"]["lr"] = doc["run"]["lr"] * 2
    # Execute
    other = Genesis.from_dict(doc)
    # Assert
    assert other.digest != genesis.digest


def test_membership_lookups(genesis, identities):
    # Prepare: nodes listed in reverse order
    shuffled = Genesis.from_dict({**genesis.to_dict(), "nodes": genesis.to_dict()["nodes"][::-1]})
    # Execute
    members = shuffled.membership
    # Assert
    assert [m.node_id for m in members.miners] == ["miner-0", "miner-1", "miner-2", "miner-3"]
    assert [c.node_id for c in members.clients] == ["client-000", "client-001", "client-002"]
    assert members.server.node_id == "server"
    assert members.miner(2).node_id == "miner-2"
    assert members.by_public_key(identities["client-001"].public_key).node_id == "client-001"
    assert members.by_public_key(bytes(32)) is None
    assert members.get("nobody") is None
    assert "miner-3" in members and len(members) == 8


def test_defaults_are_those_of_fl_selection():
    # Prepare
    w1_w3 = inspect.signature(self_assessment).parameters["weights"].default
    params = {f.name: f.default for f in fields(SelectionParams)}
    # Execute
    weights = SelectionWeights()
    # Assert
    assert weights.self_assessment == w1_w3
    assert (weights.w4, weights.w5) == (params["w4"], params["w5"])


def test_view_timeout_in_ticks_rounds_up():
    assert ProtocolParams(tick_ms=30, view_timeout_ms=100).view_timeout_ticks == 4


def _mutated(genesis, change):
    doc = copy.deepcopy(genesis.to_dict())
    change(doc)
    return doc


def _set(path, value):
    def change(doc):
        *parents, last = path
        for key in parents:
            doc = doc[key]
        doc[last] = value

    return change


def _node(index, **updates):
    return lambda doc: doc["nodes"][index].update(updates)


def _drop_server(doc):
    doc["nodes"] = [n for n in doc["nodes"] if n["role"] != "server"]


def _add_miner(doc):
    miner = {**doc["nodes"][1], "id": "miner-4", "replica": 4}
    doc["nodes"].append({**miner, "public_key": "ab" * 32, "address": "127.0.0.1:60000"})


CASES = [
    ("duplicate id", _node(2, id="miner-0"), "duplicate id miner-0"),
    (
        "duplicate key",
        lambda d: d["nodes"][2].update(public_key=d["nodes"][1]["public_key"]),
        "duplicate public key",
    ),
    ("duplicate address", _node(2, address="127.0.0.1:50052"), "duplicate address"),
    ("n != 3f+1", _set(("protocol", "miners"), 5), "must be 3f+1 = 4"),
    ("f = 0", _set(("protocol", "f"), 0), "protocol.f must be >= 1"),
    ("miner count", _add_miner, "expected 4 miners, found 5"),
    ("unknown role", _node(5, role="observer"), "role must be one of"),
    ("missing server", _drop_server, "exactly one server"),
    ("bad hex", _node(1, public_key="zz" * 32), "64 lowercase hex"),
    ("short key", _node(1, public_key="ab" * 31), "64 lowercase hex"),
    ("replica on a client", _node(5, replica=0), "only miners have a replica"),
    ("replica gap", _node(1, replica=7), "replica values must be exactly 0..3"),
    ("client index gap", _node(5, client_index=9), "client_index values must be exactly"),
    ("bad address", _node(1, address="localhost"), "host:port"),
    ("bad port", _node(1, address="localhost:70000"), "host:port"),
    ("client with a port", _node(5, address="127.0.0.1:50056"), "listens on no port"),
    ("client host", _node(5, address="a host"), "host name or IP"),
    ("bad node id", _node(1, id="../etc"), "letters, digits"),
    ("chunk too big", _set(("protocol", "chunk_bytes"), 2 << 20), "chunk_bytes must be in"),
    (
        "unknown selection seed",
        _set(("protocol", "selection_seed"), "hash"),
        "protocol.selection_seed must be 'block' or 'run', got 'hash'",
    ),
    (
        "selection seed type",
        _set(("protocol", "selection_seed"), 1),
        "protocol.selection_seed must be str, got 1",
    ),
    ("negative weight", _set(("selection", "w5"), -1.0), "selection.w5"),
    ("run value", _set(("run", "frac"), 2.0), "--frac must be in"),
    ("run type", _set(("run", "lr"), "fast"), "run.lr must be float"),
    ("run unknown key", _set(("run", "learning_rate"), 0.1), "unknown key"),
    ("bool for int", _set(("protocol", "tick_ms"), True), "protocol.tick_ms must be int"),
    ("client count", _set(("run", "clients"), 4), "expected 4 clients, found 3"),
    ("version", _set(("version",), 2), "version 2 is not supported"),
    ("missing table", lambda d: d.pop("protocol"), "genesis lacks protocol"),
    (
        "public noise outside a testbed",
        _set(("run", "reproducible_noise"), True),
        "allowed only on a testbed (protocol.testbed = true)",
    ),
]


def test_reproducible_noise_loads_on_a_testbed_genesis(genesis):
    # Prepare
    doc = _mutated(genesis, _set(("run", "reproducible_noise"), True))
    doc["protocol"]["testbed"] = True
    # Execute
    loaded = Genesis.from_dict(doc)
    # Assert
    assert loaded.run.reproducible_noise and loaded.protocol.testbed


@pytest.mark.parametrize(("change", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_invalid_genesis_is_rejected_with_a_plain_message(genesis, change, message):
    # Prepare
    doc = _mutated(genesis, change)
    # Execute / Assert
    with pytest.raises(GenesisError, match=re.escape(message)):
        Genesis.from_dict(doc)


def test_unreadable_file_names_the_path(tmp_path):
    # Prepare
    path = tmp_path / "genesis.toml"
    path.write_text("[protocol\n")
    # Execute / Assert
    with pytest.raises(GenesisError, match=r"genesis\.toml is not valid TOML"):
        read_genesis(path)


def test_errors_in_a_file_name_the_file(tmp_path, genesis):
    # Prepare
    path = tmp_path / "genesis.toml"
    write_genesis(genesis, path)
    path.write_text(path.read_text().replace("miners = 4", "miners = 7"))
    # Execute / Assert
    with pytest.raises(GenesisError, match=r"genesis\.toml: invalid genesis: protocol\.miners"):
        read_genesis(path)


@pytest.mark.parametrize(
    ("address", "expected"),
    [("10.0.0.2:50051", ("10.0.0.2", 50051)), ("[::1]:9000", ("[::1]", 9000))],
)
def test_split_address(address, expected):
    assert split_address(address) == expected


def test_plan_addresses_uses_ids_then_roles_then_default(tmp_path):
    # Prepare
    nodes = [("server", "server"), ("miner-0", "miner"), ("miner-1", "miner"), ("c", "client")]
    hosts_file = tmp_path / "hosts.toml"
    hosts_file.write_text(
        'default = "10.0.0.9"\nminer = "10.0.0.2"\n"miner-1" = "10.0.0.3:7000"\nserver = "::1"\n'
    )
    # Execute
    addresses = plan_addresses(nodes, hosts=load_host_map(hosts_file), base_port=6000)
    # Assert
    assert addresses == {
        "server": "[::1]:6000",
        "miner-0": "10.0.0.2:6001",
        "miner-1": "10.0.0.3:7000",
        "c": "10.0.0.9",  # a client listens on nothing: its host only
    }


def test_a_range_of_client_ids_shares_a_host_and_an_id_entry_overrides_it():
    # Prepare: 8 clients over two hosts, client-005 moved to a third
    nodes = [("server", "server"), *((f"client-{i:03d}", "client") for i in range(8))]
    hosts = {
        "client-000..client-003": "198.18.0.20",
        "client-004..client-007": "198.18.0.21",
        "client-005": "198.18.0.22",
    }
    # Execute
    addresses = plan_addresses(nodes, hosts=hosts, base_port=6000)
    # Assert: hosts only (clients dial out)
    assert [addresses[f"client-{i:03d}"] for i in range(8)] == [
        *(["198.18.0.20"] * 4),
        "198.18.0.21",
        "198.18.0.22",
        "198.18.0.21",
        "198.18.0.21",
    ]


def test_a_host_map_giving_a_client_a_port_is_a_plain_error():
    with pytest.raises(GenesisError, match="client-000: a client listens on no port"):
        plan_addresses([("client-000", "client")], hosts={"client": "10.0.0.2:7000"}, base_port=1)


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("client-000..client-009", "both ends must be node ids"),
        ("client-003..client-001", "from a node id to a later one"),
        ("miner-0..client-001", "from a node id to a later one"),
    ],
)
def test_a_bad_host_map_range_is_a_plain_error(key, message):
    nodes = [("miner-0", "miner"), *((f"client-{i:03d}", "client") for i in range(4))]
    with pytest.raises(GenesisError, match=message):
        plan_addresses(nodes, hosts={key: "198.18.0.20"}, base_port=6000)


def test_overlapping_host_map_ranges_are_refused():
    nodes = [(f"client-{i:03d}", "client") for i in range(4)]
    hosts = {"client-000..client-002": "198.18.0.20", "client-002..client-003": "198.18.0.21"}
    with pytest.raises(GenesisError, match="overlap at client-002"):
        plan_addresses(nodes, hosts=hosts, base_port=6000)


def test_host_map_with_unknown_names_is_rejected():
    with pytest.raises(GenesisError, match="unknown nodes or roles: minre"):
        plan_addresses([("server", "server")], hosts={"minre": "10.0.0.2"}, base_port=6000)


def test_json_host_map(tmp_path):
    # Prepare
    path = tmp_path / "hosts.json"
    path.write_text('{"miner": "10.0.0.2"}')
    # Execute / Assert
    assert load_host_map(path) == {"miner": "10.0.0.2"}
