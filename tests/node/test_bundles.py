"""network init --bundles: one folder per host with its keys only and the exact commands."""

from __future__ import annotations

import subprocess
from pathlib import Path

from click.testing import CliRunner

from cli import main

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
    # ... and a run.sh that the shell parses, one process per miner, one for the clients
    miners_script = (bundles / "198.18.0.10" / "run.sh").read_text()
    clients_script = (bundles / "198.18.0.20" / "run.sh").read_text()
    for script in (miners_script, clients_script):
        subprocess.run(["sh", "-n", "/dev/stdin"], input=script, text=True, check=True)
    assert miners_script.count("llbcfl node") == 4 and "--role miner" in miners_script
    assert clients_script.count("llbcfl node") == 1
    assert "--key keys/client-002.key" in clients_script and "client-003" not in clients_script
    assert "50058" in (bundles / "198.18.0.20" / "README.txt").read_text()
