"""network init --bundles: one folder per host with its keys only and the exact commands."""

from __future__ import annotations

import subprocess
from pathlib import Path

from click.testing import CliRunner

from cli import main
from commands.bundle import bundle_processes

HOSTS = """default = "198.18.0.10"
server = "198.18.0.2"
"client-000..client-002" = "198.18.0.20"
"client-003..client-005" = "198.18.0.21"
"""


def test_each_host_gets_the_genesis_its_own_keys_and_a_run_script(tmp_path: Path) -> None:
    # Prepare
    hosts = tmp_path / "hosts.toml"
    hosts.write_text(HOSTS)
    out = tmp_path / "net"
    # Execute
    args = ["network", "init", "--out", str(out), "--host-map", str(hosts), "--clients", "6"]
    result = CliRunner().invoke(main, [*args, "--bundles"])
    # Assert: four hosts, each with exactly its nodes' keys (0600, folder 0700)
    assert result.exit_code == 0, result.output
    bundles = out / "hosts"
    assert sorted(p.name for p in bundles.iterdir()) == [
        "198.18.0.10",
        "198.18.0.2",
        "198.18.0.20",
        "198.18.0.21",
    ]
    keys = {h.name: sorted(k.name for k in (h / "keys").iterdir()) for h in bundles.iterdir()}
    assert keys["198.18.0.2"] == ["server.key"]
    assert keys["198.18.0.10"] == [f"miner-{i}.key" for i in range(4)]
    assert keys["198.18.0.21"] == ["client-003.key", "client-004.key", "client-005.key"]
    for host in bundles.iterdir():
        assert (host / "genesis.toml").read_bytes() == (out / "genesis.toml").read_bytes()
        assert (host / "keys").stat().st_mode & 0o777 == 0o700
        assert all(k.stat().st_mode & 0o777 == 0o600 for k in (host / "keys").iterdir())
        for key in (host / "keys").iterdir():
            assert key.read_bytes() == (out / "keys" / key.name).read_bytes()
    # ... a run.sh the shell parses, that runs the folder with node --bundle; a README
    # with the ports to open
    for host in bundles.iterdir():
        script = (host / "run.sh").read_text()
        subprocess.run(["sh", "-n", "/dev/stdin"], input=script, text=True, check=True)
        assert 'exec llbcfl node --bundle "$here"' in script
    assert "50052, 50053, 50054, 50055" in (bundles / "198.18.0.10" / "README.txt").read_text()
    assert "Opens no port" in (bundles / "198.18.0.20" / "README.txt").read_text()


def test_a_bundle_runs_one_process_per_miner_and_one_for_its_clients(tmp_path: Path) -> None:
    # Prepare: a host with the server, the miners and three clients; another with three
    hosts = tmp_path / "hosts.toml"
    hosts.write_text('default = "198.18.0.10"\n"client-003..client-005" = "198.18.0.21"\n')
    out = tmp_path / "net"
    args = ["network", "init", "--out", str(out), "--host-map", str(hosts), "--clients", "6"]
    assert CliRunner().invoke(main, [*args, "--bundles"]).exit_code == 0
    state = tmp_path / "state"
    # Execute
    procs = bundle_processes(
        out / "hosts" / "198.18.0.10", state_dir=state, bind_host="0.0.0.0", data_dir="/srv"
    )
    # Assert: 4 miners, the server, one process for client-000..002, state under STATE
    names = [p.name for p in procs]
    assert names == ["miner-0", "miner-1", "miner-2", "miner-3", "server", "clients"]
    procs = bundle_processes(out / "hosts" / "198.18.0.21", state_dir=state)
    assert [p.name for p in procs] == ["clients"]
    clients = procs[0].command
    keys = [clients[i + 1] for i, a in enumerate(clients) if a == "--key"]
    assert [Path(k).name for k in keys] == ["client-003.key", "client-004.key", "client-005.key"]
    assert clients[clients.index("--privacy-ledger") + 1] == str(state / "privacy-ledger.json")
    miner = bundle_processes(out / "hosts" / "198.18.0.10", state_dir=state, bind_host="0.0.0.0")[
        0
    ].command
    assert miner[miner.index("--state-dir") + 1] == str(state / "miner-0")
    assert miner[miner.index("--bind-host") + 1] == "0.0.0.0"


def test_a_folder_without_keys_is_not_a_bundle(tmp_path: Path) -> None:
    # Prepare
    out = tmp_path / "net"
    assert CliRunner().invoke(main, ["network", "init", "--out", str(out)]).exit_code == 0
    (tmp_path / "empty" / "keys").mkdir(parents=True)
    (tmp_path / "empty" / "genesis.toml").write_bytes((out / "genesis.toml").read_bytes())
    # Execute
    result = CliRunner().invoke(main, ["node", "--bundle", str(tmp_path / "empty")])
    # Assert: a plain error, no traceback
    assert result.exit_code == 1 and "holds no key file" in result.output
    assert "Traceback" not in result.output
