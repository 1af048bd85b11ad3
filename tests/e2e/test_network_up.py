"""End to end: ``cli.py network up`` starts real node processes on 127.0.0.1.

One run (4 miners, 6 clients in 2 processes, 3 rounds, tiny MLP) is checked
for rising accuracy, one head hash on every miner, selection seeds equal to
the digests of the blocks that closed the previous rounds, ``chain verify``
and ``chain show`` on the chains, and its progress on a pipe (one line per
round). The same run with ``--selection-seed run`` is checked for equality
with ``simulate`` (selected, accepted and rejected sets, reputations, test
accuracy). Other runs SIGKILL a backup miner after round 1 (the other three
finish the run; with ``--quiet``, no progress lines), SIGKILL the primary
after round 1 and restart it after round 2 (view change, then catch-up),
interrupt ``network up`` with Ctrl-C (every node stops), and start every
node by hand with ``cli.py node`` and ``--selection-seed run``, restarting
the server after round 1 (it resumes from its checkpoint, fetches no update
of the rounds before it, and the resumed run still equals ``simulate``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from chain.records import Registration, RoundSummary, RoundVerdicts, Selection, decode_operation
from chain.simulator import run_simulation
from commands.chaintools import read_blocks
from consensus.ledger import Block
from fl.config import RunConfig
from fl.data import load_mnist

ROOT = Path(__file__).resolve().parents[2]
OPTIONS = {
    "model": "mlp",
    "train_size": 2000,
    "clients": 6,
    "frac": 0.5,
    "rounds": 3,
    "val_size": 200,
    "test_size": 500,
}


def cli_args() -> list[str]:
    return [f"--{k.replace('_', '-')}={v}" for k, v in OPTIONS.items()]


def network_up(run_dir: Path, mnist_root: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "LLBCFL_DATA": str(mnist_root)}
    command = [sys.executable, str(ROOT / "cli.py"), "network", "up", *cli_args()]
    command += ["--miners", "4", "--client-procs", "2", "--run-dir", str(run_dir)]
    command += ["--timeout", "240", *extra]
    return subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def finish(process: subprocess.Popen) -> str:
    try:
        output, _ = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGINT)  # the launcher then stops every node it started
        output, _ = process.communicate(timeout=60)
        pytest.fail(f"network up did not finish:\n{output}")
    assert process.returncode == 0, output
    return output


def finished_run(run_dir: Path, mnist_root: Path, *extra: str) -> dict[str, Any]:
    output = finish(network_up(run_dir, mnist_root, *extra))
    doc = json.loads((run_dir / "metrics.json").read_text())
    doc["_run_dir"] = run_dir
    doc["_output"] = output  # stdout and stderr, a pipe: not a terminal
    return doc


@pytest.fixture(scope="module")
def network_run(tmp_path_factory: pytest.TempPathFactory, mnist_root: Path) -> dict[str, Any]:
    """Default selection seeds: the digests of the blocks that closed the previous rounds."""
    run_dir = tmp_path_factory.mktemp("net") / "run"
    return finished_run(run_dir, mnist_root, "--plot", str(run_dir.parent / "run.png"))


# Gaussian local DP with noise from the seed: the one way a network run can
# be compared with simulate number for number (never outside a testbed).
REPRODUCIBLE_DP = {"dp": "gaussian", "epsilon": 10.0, "reproducible_noise": True}


def option_args(options: dict[str, Any]) -> list[str]:
    return [
        f"--{k.replace('_', '-')}" if v is True else f"--{k.replace('_', '-')}={v}"
        for k, v in options.items()
    ]


@pytest.fixture(scope="module")
def run_seeded_network(
    tmp_path_factory: pytest.TempPathFactory, mnist_root: Path
) -> dict[str, Any]:
    """Selection seeds from --seed and reproducible DP noise, as in ``simulate``."""
    run_dir = tmp_path_factory.mktemp("net-run-seed") / "run"
    extra = ["--selection-seed", "run", *option_args(REPRODUCIBLE_DP)]
    return finished_run(run_dir, mnist_root, *extra)


def round_one_digests(run_dir: Path) -> dict[str, bytes]:
    """Client -> digest of its round-1 update, from miner-0's chain."""
    for block in read_blocks(run_dir / "miner-0" / "chain.db"):
        for request in block.requests():
            record = decode_operation(request.operation)[1]
            if isinstance(record, RoundVerdicts) and record.round == 1:
                return {u.client: u.digest for u in record.updates}
    raise AssertionError("no verdicts for round 1 on the chain")


@pytest.fixture(scope="module")
def twin_networks(
    tmp_path_factory: pytest.TempPathFactory, mnist_root: Path
) -> dict[str, list[dict[str, bytes]]]:
    """Round-1 update digests of two one-round DP networks with the same seed and
    config, with secret noise and with reproducible noise."""
    base = ["--rounds", "1", "--selection-seed", "run", "--dp", "gaussian", "--epsilon", "10"]
    out: dict[str, list[dict[str, bytes]]] = {}
    for noise, extra in (("secret", []), ("reproducible", ["--reproducible-noise"])):
        runs = []
        for i in range(2):
            run_dir = tmp_path_factory.mktemp(f"twin-{noise}-{i}") / "run"
            finished_run(run_dir, mnist_root, *base, *extra)
            runs.append(round_one_digests(run_dir))
        out[noise] = runs
    return out


def test_two_networks_with_secret_noise_upload_different_updates(
    twin_networks: dict[str, list[dict[str, bytes]]],
) -> None:
    first, second = twin_networks["secret"]
    # Assert: the same clients took part, and every update differs
    assert sorted(first) == sorted(second) and len(first) == 3
    assert all(first[c] != second[c] for c in first)


def test_two_networks_with_reproducible_noise_upload_identical_updates(
    twin_networks: dict[str, list[dict[str, bytes]]],
) -> None:
    first, second = twin_networks["reproducible"]
    assert first == second and len(first) == 3


def test_accuracy_rises_over_the_rounds(network_run: dict[str, Any]) -> None:
    accuracies = [r["accuracy"] for r in network_run["rounds"]]
    assert len(accuracies) == 3
    assert accuracies[-1] > accuracies[0]


def round_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("round ")]


def test_progress_to_a_pipe_is_one_line_per_round_with_accuracy_and_blocks(
    network_run: dict[str, Any],
) -> None:
    # Prepare
    records = network_run["rounds"]
    lines = round_lines(network_run["_output"])
    # Assert: in order, each with the round's accuracy and the chain height
    # once its summary was committed (before the next round's summary)
    assert len(lines) == len(records) == 3
    summaries = [r["block_height"] for r in records] + [float("inf")]
    for i, (line, record) in enumerate(zip(lines, records, strict=True)):
        assert line.startswith(f"round {i + 1}/3: test accuracy {record['accuracy']:.4f}, ")
        blocks = int(re.search(r", (\d+) blocks, ", line).group(1))
        assert summaries[i] <= blocks < summaries[i + 1]
        assert "elapsed" in line and "ε" not in line  # no DP in this run
    assert "\r" not in network_run["_output"]


def test_every_miner_has_the_same_head(network_run: dict[str, Any]) -> None:
    heads = network_run["chain_heads"]
    assert sorted(heads) == ["miner-0", "miner-1", "miner-2", "miner-3"]
    assert len(set(heads.values())) == 1


def test_selection_seeds_are_the_blocks_that_closed_the_previous_rounds(
    network_run: dict[str, Any],
) -> None:
    # Prepare: each block's records, in chain order
    blocks = read_blocks(network_run["_run_dir"] / "miner-0" / "chain.db")
    registered: set[str] = set()
    closed_by: dict[int, bytes] = {}  # round -> digest of the block that made it due
    seeds: dict[int, bytes] = {}
    last_timestamp: dict[str, int] = {}
    # Execute
    for block in blocks:
        for request in block.requests():
            if request.timestamp <= last_timestamp.get(request.client, -1):
                continue  # a re-submission, skipped at execution
            last_timestamp[request.client] = request.timestamp
            record = decode_operation(request.operation)[1]
            if isinstance(record, Registration):
                registered.add(record.client)
                if len(registered) == OPTIONS["clients"]:
                    closed_by.setdefault(1, block.digest)
            elif isinstance(record, RoundSummary):
                closed_by[record.round + 1] = block.digest
            elif isinstance(record, Selection):
                seeds[record.round] = record.seed
    # Assert
    assert sorted(seeds) == [1, 2, 3]
    assert seeds == {rnd: closed_by[rnd] for rnd in seeds}


def test_network_up_verifies_every_chain_and_prints_the_summary(
    network_run: dict[str, Any],
) -> None:
    lines = network_run["_output"].splitlines()
    plot = network_run["_run_dir"].parent / "run.png"
    height = read_blocks(network_run["_run_dir"] / "miner-0" / "chain.db")[-1].height
    assert any(line.startswith("run summary: 3 rounds in ") for line in lines)
    assert any(line.startswith("  accuracy: final ") for line in lines)
    assert (
        f"  chain: 4 miners at height {height}, one head; `chain verify` OK on every one" in lines
    )
    assert f"  plot: {plot}" in lines
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_chain_verify_passes_on_every_miner(network_run: dict[str, Any]) -> None:
    run_dir = network_run["_run_dir"]
    for i in range(4):
        db = str(run_dir / f"miner-{i}" / "chain.db")
        genesis = str(run_dir / "genesis.toml")
        result = subprocess.run(
            [
                sys.executable,
                str(ROOT / "cli.py"),
                "chain",
                "verify",
                "--db",
                db,
                "--genesis",
                genesis,
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "chain OK" in result.stdout


def test_chain_show_lists_verdicts_reputations_and_summaries(network_run: dict[str, Any]) -> None:
    db = str(network_run["_run_dir"] / "miner-1" / "chain.db")
    result = subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), "chain", "show", "--db", db],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    for round_ in (1, 2, 3):
        assert f"selection round {round_}:" in result.stdout
        assert f"verdicts round {round_}:" in result.stdout
        assert f"summary round {round_}:" in result.stdout
    assert "reputation: client-000" in result.stdout


def test_network_and_simulate_agree(run_seeded_network: dict[str, Any], mnist_root: Path) -> None:
    # Prepare: the same run (reproducible DP noise) in one process
    config = RunConfig(**OPTIONS, **REPRODUCIBLE_DP)  # type: ignore[arg-type]
    splits = load_mnist(
        mnist_root, train_size=config.train_size, val_size=config.val_size, test_size=200 + 300
    )
    # Execute
    simulated = run_simulation(config, splits, clock=time.perf_counter)
    # Assert
    for net, sim in zip(run_seeded_network["rounds"], simulated["rounds"], strict=True):
        assert net["selected"] == sim["selected"]
        assert net["accepted"] == sim["accepted"]
        assert net["rejected"] == sim["rejected"]
        assert round(net["accuracy"], 4) == round(sim["accuracy"], 4)
        assert net["reputation"] == sim["reputation"]
        assert net["epsilon_spent_max"] == pytest.approx(sim["epsilon_spent_max"], rel=1e-9)
    assert run_seeded_network["privacy"]["noise"] == "reproducible (NO PRIVACY)"


def test_progress_lines_show_the_privacy_spent_against_the_budget(
    run_seeded_network: dict[str, Any],
) -> None:
    lines = round_lines(run_seeded_network["_output"])
    spent = [f"ε {r['epsilon_spent_max']:.2f}/10, " for r in run_seeded_network["rounds"]]
    assert len(lines) == len(spent) == 3
    assert all(eps in line for eps, line in zip(spent, lines, strict=True))


def wait_for_round(run_dir: Path, process: subprocess.Popen, rnd: int) -> None:
    progress = run_dir / "server" / "progress.json"
    deadline = time.monotonic() + 200
    while process.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            if json.loads(progress.read_text())["round"] >= rnd:
                return
        time.sleep(0.1)  # waiting on another process (a condition with a deadline)
    pytest.fail(f"round {rnd} never completed")


def last_proposer(db: Path) -> int:
    """Replica index of the primary that proposed the newest block (read-only)."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        (data,) = con.execute("SELECT data FROM blocks ORDER BY height DESC LIMIT 1").fetchone()
    finally:
        con.close()
    return Block.decode(bytes(data)).header.proposer


def test_killed_primary_is_replaced_and_catches_up_after_restart(
    tmp_path: Path, mnist_root: Path
) -> None:
    # Prepare
    run_dir = tmp_path / "run"
    process = network_up(run_dir, mnist_root, "--rounds", "4")
    restarted: subprocess.Popen | None = None
    try:
        wait_for_round(run_dir, process, 1)
        primary = f"miner-{last_proposer(run_dir / 'miner-0' / 'chain.db')}"
        nodes = json.loads((run_dir / "pids.json").read_text())
        # Execute: SIGKILL the primary; restart it (same store) after round 2
        os.kill(nodes[primary]["pid"], signal.SIGKILL)
        wait_for_round(run_dir, process, 2)
        with open(run_dir / primary / "log", "ab") as log:
            restarted = subprocess.Popen(
                nodes[primary]["command"], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT
            )
        finish(process)
    finally:
        if restarted is not None and restarted.poll() is None:
            restarted.terminate()
            restarted.wait(30)
    # Assert: every round done, and the restarted miner holds the same head
    doc = json.loads((run_dir / "metrics.json").read_text())
    assert [r["round"] for r in doc["rounds"]] == [1, 2, 3, 4]
    assert sorted(doc["chain_heads"]) == ["miner-0", "miner-1", "miner-2", "miner-3"]
    assert len(set(doc["chain_heads"].values())) == 1
    views = [b.header.view for b in read_blocks(run_dir / "miner-0" / "chain.db")]
    assert max(views) > min(views)  # a view change happened


def test_killed_backup_miner_does_not_stop_the_run(tmp_path: Path, mnist_root: Path) -> None:
    # Prepare
    run_dir = tmp_path / "run"
    process = network_up(run_dir, mnist_root, "--quiet")
    try:
        wait_for_round(run_dir, process, 1)
        primary = last_proposer(run_dir / "miner-0" / "chain.db")
        victim = f"miner-{(primary + 1) % 4}"
        nodes = json.loads((run_dir / "pids.json").read_text())
        # Execute: SIGKILL one backup (non-primary) miner after round 1
        os.kill(nodes[victim]["pid"], signal.SIGKILL)
        output = finish(process)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            process.communicate(timeout=60)
    # Assert: every round done by the three others, which agree on one chain;
    # the killed miner's chain is a prefix of it
    doc = json.loads((run_dir / "metrics.json").read_text())
    assert [r["round"] for r in doc["rounds"]] == [1, 2, 3]
    alive = {m: h for m, h in doc["chain_heads"].items() if m != victim}
    assert len(alive) == 3 and len(set(alive.values())) == 1
    survivor = next(iter(alive))
    full = [b.digest for b in read_blocks(run_dir / survivor / "chain.db")]
    killed = [b.digest for b in read_blocks(run_dir / victim / "chain.db")]
    assert 0 < len(killed) < len(full)
    assert killed == full[: len(killed)]
    # --quiet: no progress, only the summary at the end
    assert [line for line in output.splitlines() if line.startswith(("round", "started"))] == []
    assert output.startswith("run summary: 3 rounds") and "accuracy: final" in output


def test_chain_verify_names_the_first_tampered_height(
    network_run: dict[str, Any], tmp_path: Path
) -> None:
    # Prepare: a copy of a chain whose block 3 payload has one byte flipped
    db = tmp_path / "chain.db"
    shutil.copy(network_run["_run_dir"] / "miner-0" / "chain.db", db)
    with sqlite3.connect(db) as con:
        (data,) = con.execute("SELECT data FROM blocks WHERE height = 3").fetchone()
        tampered = bytearray(data)
        tampered[-200] ^= 1
        con.execute("UPDATE blocks SET data = ? WHERE height = 3", (bytes(tampered),))
    # Execute
    genesis = str(network_run["_run_dir"] / "genesis.toml")
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "cli.py"),
            "chain",
            "verify",
            "--db",
            str(db),
            "--genesis",
            genesis,
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    # Assert
    assert result.returncode == 1
    assert "height 3" in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


def test_ctrl_c_stops_every_node_process(tmp_path: Path, mnist_root: Path) -> None:
    # Prepare: a long run, interrupted once round 1 is done
    run_dir = tmp_path / "run"
    env = {**os.environ, "LLBCFL_DATA": str(mnist_root)}
    command = [sys.executable, str(ROOT / "cli.py"), "network", "up", *cli_args()]
    command += ["--rounds", "100", "--client-procs", "1", "--run-dir", str(run_dir)]
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        wait_for_round(run_dir, process, 1)
        # Execute
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    # Assert
    assert process.returncode == 130, output
    for node in json.loads((run_dir / "pids.json").read_text()).values():
        with pytest.raises(ProcessLookupError):
            os.kill(node["pid"], 0)  # signal 0: existence check only


def test_nodes_started_by_hand_and_a_restarted_server_match_simulate(
    tmp_path: Path, mnist_root: Path
) -> None:
    # Prepare: network init with a host map of free ports, then one `node` per role
    from commands.launcher import free_ports
    from node.genesis import node_ids

    options = {**OPTIONS, "clients": 4, "rounds": 3}
    run_options = [f"--{k.replace('_', '-')}={v}" for k, v in options.items()]
    plan = [n for n, role in node_ids(miners=4, clients=4) if role != "client"]  # clients dial out
    hosts = {n: f"127.0.0.1:{p}" for n, p in zip(plan, free_ports(len(plan)), strict=True)}
    (tmp_path / "hosts.json").write_text(json.dumps(hosts))
    net = tmp_path / "net"
    cli = [sys.executable, str(ROOT / "cli.py")]
    hosts_file = str(tmp_path / "hosts.json")
    init = [*cli, "network", "init", "--out", str(net), "--host-map", hosts_file, *run_options]
    init += ["--selection-seed", "run"]  # compared with simulate below
    subprocess.run(init, check=True, cwd=ROOT, capture_output=True)
    env = {**os.environ, "LLBCFL_DATA": str(mnist_root)}
    node = [*cli, "node", "--genesis", str(net / "genesis.toml")]
    keys = net / "keys"
    client_keys = tmp_path / "client-keys"
    client_keys.mkdir(mode=0o700)
    for key in keys.glob("client-*.key"):
        shutil.copy2(key, client_keys / key.name)

    logs = []

    def start(*args: str, name: str) -> subprocess.Popen:
        logs.append(open(tmp_path / f"{name}.log", "ab"))  # noqa: SIM115 - closed below
        return subprocess.Popen(
            [*node, *args], cwd=ROOT, env=env, stdout=logs[-1], stderr=subprocess.STDOUT
        )

    server_args = ["--role", "server", "--key", str(keys / "server.key")]
    server_args += ["--run-dir", str(tmp_path / "server")]
    server_args += ["--metrics-out", str(tmp_path / "metrics.json")]
    started: list[subprocess.Popen] = []
    try:
        for i in range(4):
            miner_key = str(keys / f"miner-{i}.key")
            miner_dir = str(tmp_path / f"miner-{i}")
            started.append(
                start("--role", "miner", "--key", miner_key, "--run-dir", miner_dir, name=f"m{i}")
            )
        ledger = str(tmp_path / "clients" / "privacy-ledger.json")
        started.append(
            start(
                "--role",
                "client",
                "--key-dir",
                str(client_keys),
                "--privacy-ledger",
                ledger,
                "--tls-dir",  # the keys were copied away from the network's tls/
                str(net / "tls"),
                name="clients",
            )
        )
        server = start(*server_args, name="server")
        started.append(server)
        wait_for_round(tmp_path, server, 1)
        # Execute: stop the server after round 1 and start it again
        server.terminate()
        assert server.wait(30) == 0
        restarted = start(*server_args, name="server")
        started.append(restarted)
        assert restarted.wait(200) == 0
        # Assert: the end of the run reaches every node: the miners (after serving
        # their final blocks for 30 s) and the client process exit 0 by themselves
        for process in started[:5]:
            assert process.wait(120) == 0
    finally:
        for process in started:
            if process.poll() is None:
                process.terminate()
                process.wait(30)
        for log in logs:
            log.close()
    for name in ("m0", "m3", "clients"):
        assert "the run is over" in (tmp_path / f"{name}.log").read_text()
    # Assert: the restarted server resumed from a checkpoint, fetched no update of
    # a round up to it, and gives the same numbers as simulate
    restarted_log = (tmp_path / "server.log").read_text().split("server listening on")[-1]
    resumed = re.findall(r"resuming from round-(\d+)\.pt", restarted_log)
    assert len(resumed) == 1, restarted_log
    fetched = [int(r) for r in re.findall(r"fetched round (\d+) update", restarted_log)]
    assert all(r > int(resumed[0]) for r in fetched), restarted_log
    network_doc = json.loads((tmp_path / "metrics.json").read_text())
    config = RunConfig(**options)  # type: ignore[arg-type]
    splits = load_mnist(mnist_root, train_size=2000, val_size=200, test_size=500)
    simulated = run_simulation(config, splits, clock=time.perf_counter)
    for net_round, sim_round in zip(network_doc["rounds"], simulated["rounds"], strict=True):
        assert net_round["selected"] == sim_round["selected"]
        assert net_round["accepted"] == sim_round["accepted"]
        assert round(net_round["accuracy"], 4) == round(sim_round["accuracy"], 4)
