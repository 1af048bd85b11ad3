"""Faults on a network of seven hosts, deployed from its bundles: one implementation for
tests/multihost/test_lan.py and bench/faults.py.

The network: the server on 198.18.0.2, one miner per host on .3 to .6
(``miner-i`` on ``MINERS[i]``, so a host's processes are that miner and its
``run.sh`` runner), two clients on each of .20 and .21 (one client process
each). Every host runs its folder of ``network init --bundles`` with ``sh
run.sh`` in its namespace, its state under ``LLBCFL_STATE``; a restart runs
the same ``run.sh`` again with the same state.

Everything is observed through what a deployment shows: the server's
``progress.json``, the nodes' logs (PBFT views, "the run is over", the
clients' reservations), the miners' ``chain.db`` (read-only: its height),
``chain verify`` and ``chain show``. Faults start from observed state (round
1 summarised, a client's reservation); only their length is a timed wait.
Processes are signalled by pid (``ip netns pids`` of the host), never by name.

Each fault returns a :class:`Record` (wall-clock times of its start and end)
and has an ``after`` check of what it must leave behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from tests.multihost.netns import Lan

ROOT = Path(__file__).resolve().parents[2]
SERVER = "198.18.0.2"
MINERS = ("198.18.0.3", "198.18.0.4", "198.18.0.5", "198.18.0.6")  # miner-i on MINERS[i]
CLIENTS = ("198.18.0.20", "198.18.0.21")
N = len(MINERS)
HOST_MAP = "\n".join(
    [
        f'server = "{SERVER}"',
        *(f'miner-{i} = "{host}"' for i, host in enumerate(MINERS)),
        f'"client-000..client-001" = "{CLIENTS[0]}"',
        f'"client-002..client-003" = "{CLIENTS[1]}"',
        "",
    ]
)
ROUNDS = 3
RUN = ["--model", "mlp", "--train-size", "1200", "--clients", "4", "--frac", "0.5"]
RUN += ["--rounds", str(ROUNDS), "--val-size", "200", "--test-size", "500"]
RUN += ["--round-deadline", "10", "--view-timeout", "1"]
DOWN_SECONDS = 2.0  # a killed process stays down this long before its restart
OUTAGE_SECONDS = 8.0  # a stopped process, a cut link, two miners down
WAIT_SECONDS = 180.0  # any one observed step of a run (start-up included)
POLL_SECONDS = 0.1
EXITED = "every node of this bundle has exited (status 0)"
_T = TypeVar("_T")


class FaultError(AssertionError):
    """The network did not do what the fault suite expects."""


def log_time(line: str) -> float:
    """The wall-clock time of a node's log line (``2026-12-01 11:28:43,500 ...``)."""
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


@dataclass
class Record:
    """One applied fault. ``kind`` "kill": recovery counts from the kill (``started``);
    "outage": from the end of the outage (``ended``)."""

    fault: str
    kind: str
    hosts: tuple[str, ...] = ()
    started: float = 0.0  # wall clock
    ended: float = 0.0
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def reference(self) -> float:
        return self.started if self.kind == "kill" else self.ended


class Watch:
    """Samples every miner's chain height (``chain.db``, read-only) every POLL_SECONDS;
    each sample is stamped when its reads ended (a block in it was on disk by then)."""

    def __init__(self, net: Network) -> None:
        self.net = net
        self.samples: list[tuple[float, tuple[int, ...]]] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.is_set():
            heights = self.net.heights()
            self.samples.append((time.time(), heights))
            self.done.wait(POLL_SECONDS)

    def stop(self) -> None:
        self.done.set()
        self.thread.join(timeout=10)

    def between(self, start: float, end: float) -> list[tuple[float, tuple[int, ...]]]:
        return [(t, h) for t, h in list(self.samples) if start <= t <= end]


class Network:
    """A network initialised under ``root``, its hosts added to ``lan``, not started."""

    def __init__(self, lan: Lan, root: Path, data_dir: Path, run: list[str] = RUN) -> None:
        self.lan, self.root = lan, root
        root.mkdir(parents=True, exist_ok=True)
        (root / "hosts.toml").write_text(HOST_MAP)
        self.net = root / "net"
        init = [sys.executable, str(ROOT / "cli.py"), "network", "init", "--out", str(self.net)]
        init += ["--host-map", str(root / "hosts.toml"), "--bundles", *run]
        subprocess.run(init, check=True, capture_output=True, text=True, cwd=ROOT, timeout=120)
        self.genesis = self.net / "genesis.toml"
        bundles = sorted(p.name for p in (self.net / "hosts").iterdir())
        assert bundles == sorted((SERVER, *MINERS, *CLIENTS)), bundles
        for host in (SERVER, *MINERS, *CLIENTS):
            lan.add_host(host)
        self.env = {
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "LLBCFL_DATA": str(data_dir),
            # `llbcfl` is this checkout's even where the venv's editable install is another's
            "PYTHONPATH": os.pathsep.join(
                [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
            ),
        }
        self.runs: dict[str, list[subprocess.Popen]] = {}
        self.down: set[str] = set()  # hosts this suite took down on purpose
        self.watch: Watch | None = None

    # Where things are ---------------------------------------------------------------
    def state(self, host: str) -> Path:
        return self.root / "state" / host

    def log_path(self, node: str) -> Path:
        if node == "server":
            return self.state(SERVER) / "server" / "log"
        if node.startswith("miner-"):
            return self.state(MINERS[int(node[6:])]) / node / "log"
        return self.state(node) / "clients" / "log"  # a client host

    def log(self, node: str) -> list[str]:
        try:
            return self.log_path(node).read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []

    def output(self, host: str, incarnation: int = -1) -> str:
        k = range(len(self.runs[host]))[incarnation]
        return (self.root / "runs" / f"{host}.{k}.out").read_text(errors="replace")

    # Processes ----------------------------------------------------------------------
    def start(self, host: str) -> float:
        """Start (or restart) ``sh run.sh`` of ``host`` in its namespace; the time."""
        runs = self.runs.setdefault(host, [])
        out = self.root / "runs" / f"{host}.{len(runs)}.out"
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w") as sink:
            runs.append(
                self.lan.spawn(
                    host,
                    ["sh", str(self.net / "hosts" / host / "run.sh")],
                    env={**self.env, "LLBCFL_STATE": str(self.state(host))},
                    stdout=sink,
                    stderr=subprocess.STDOUT,
                )
            )
        self.down.discard(host)
        return time.time()

    def start_all(self) -> None:
        """Every host, the miners first (docs/DEPLOY.md); and the height sampler."""
        for host in (*MINERS, SERVER, *CLIENTS):
            self.start(host)
        self.watch = Watch(self)

    def pids(self, host: str) -> list[int]:
        return self.lan.pids_in(self.lan.hosts[host])

    def node_pids(self, host: str) -> list[int]:
        """The host's node processes (not its runner)."""
        runners = {p.pid for p in self.runs.get(host, [])}
        return [pid for pid in self.pids(host) if pid not in runners]

    def kill(self, host: str) -> float:
        """kill -9 every process of ``host`` (its runner and nodes), by pid; the time."""
        self.down.add(host)
        at = time.time()
        for pid in self.pids(host):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.runs[host][-1].wait(timeout=10)
        self.wait_for(lambda: not self.pids(host), f"{host}'s processes gone", timeout=10)
        return at

    def signal_nodes(self, host: str, sig: signal.Signals) -> float:
        for pid in self.node_pids(host):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        return time.time()

    # What the network shows ---------------------------------------------------------
    def progress(self) -> dict[str, Any]:
        try:
            return json.loads((self.state(SERVER) / "server" / "progress.json").read_text())
        except (OSError, ValueError):
            return {}

    def heights(self) -> tuple[int, ...]:
        """Each miner's chain height as its chain.db holds it (-1: not readable yet)."""
        heights = []
        for i, host in enumerate(MINERS):
            db = self.state(host) / f"miner-{i}" / "chain.db"
            height = -1
            if db.exists():
                with contextlib.suppress(sqlite3.Error):
                    uri = f"file:{db}?mode=ro"
                    with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=1)) as con:
                        height = con.execute("SELECT MAX(height) FROM blocks").fetchone()[0] or 0
            heights.append(height)
        return tuple(heights)

    def view_changes(self, miner: int) -> list[tuple[float, int]]:
        """(time, new view) of every view change ``miner-i`` logged."""
        changes = []
        for line in self.log(f"miner-{miner}"):
            found = re.search(r"view change: view \d+ -> (\d+)", line)
            if found:
                changes.append((log_time(line), int(found.group(1))))
        return changes

    def view(self) -> int:
        """The PBFT view most miners last logged (0 before any view change)."""
        views = Counter(
            (self.view_changes(i) or [(0.0, 0)])[-1][1]
            for i in range(N)
            if MINERS[i] not in self.down
        )
        top = max(views.values())
        return max(v for v, count in views.items() if count == top)

    def primary(self) -> int:
        """The primary of the current view: miner ``view mod n``."""
        return self.view() % N

    def over(self, miner: int) -> bool:
        return any("the run is over" in line for line in self.log(f"miner-{miner}"))

    # Waiting ------------------------------------------------------------------------
    def check_running(self) -> None:
        """Fail at once when a host's runner ended with an error (not one taken down)."""
        for host, runs in self.runs.items():
            code = runs[-1].poll()
            if host not in self.down and code not in (None, 0):
                raise FaultError(f"{host}'s run.sh exited {code}:\n{self.output(host)[-3000:]}")

    def wait_for(self, probe: Callable[[], _T], what: str, *, timeout: float = WAIT_SECONDS) -> _T:
        """Poll ``probe`` until it returns something true; that value."""
        deadline = time.monotonic() + timeout
        while True:
            value = probe()
            if value:
                return value
            self.check_running()
            if time.monotonic() > deadline:
                raise FaultError(
                    f"timed out after {timeout:.0f} s waiting for {what} ({self.root})"
                )
            time.sleep(POLL_SECONDS)  # polling observed state

    def wait_round(self, rnd: int) -> None:
        """Until the server's progress.json says round ``rnd`` is summarised."""
        self.wait_for(lambda: self.progress().get("round", 0) >= rnd, f"round {rnd} summarised")

    # The end ------------------------------------------------------------------------
    def finish(self, *, linger: bool = False, timeout: float = WAIT_SECONDS) -> None:
        """The server and the client processes end by themselves, with status 0; every
        miner logs that the run is over. With ``linger`` the miners then also exit by
        themselves (30 s later); else they are sent SIGTERM (by pid). Every host's last
        run.sh must end with status 0."""
        for host in (SERVER, *CLIENTS):
            self.wait_for(lambda h=host: self.runs[h][-1].poll() is not None, f"{host} to end")
        self.check_running()
        self.wait_for(lambda: all(self.over(i) for i in range(N)), "every miner at the run's end")
        if not linger:
            # A miner that was down or paused may still be fetching the last blocks
            # (miners serve them for 30 s after the run's end): stop them once the
            # chains are all at one height.
            self.wait_for(lambda: len(set(self.heights())) == 1, "every miner at the same height")
            for host in MINERS:
                self.signal_nodes(host, signal.SIGTERM)
        for host in MINERS:
            limit = timeout if linger else 60
            self.wait_for(
                lambda h=host: self.runs[h][-1].poll() is not None, f"{host} to end", timeout=limit
            )
        if self.watch is not None:
            self.watch.stop()
        for host, runs in self.runs.items():
            if runs[-1].returncode != 0 or EXITED not in self.output(host):
                raise FaultError(f"{host} ended with {runs[-1].returncode}:\n{self.output(host)}")
        metrics = json.loads((self.state(SERVER) / "server" / "metrics.json").read_text())
        rounds = [r["round"] for r in metrics["rounds"]]
        if rounds != list(range(1, ROUNDS + 1)):
            raise FaultError(f"the server's metrics hold rounds {rounds}")

    def verify(self) -> str:
        """``chain verify`` on every miner's chain (all must pass); their one head."""
        checks = {}
        for i, host in enumerate(MINERS):
            db = self.state(host) / f"miner-{i}" / "chain.db"
            command = [sys.executable, str(ROOT / "cli.py"), "chain", "verify", "--db", str(db)]
            command += ["--genesis", str(self.genesis)]
            checks[i] = subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT
            )
        heads = {}
        for i, check in checks.items():
            out, _ = check.communicate(timeout=120)
            if check.returncode != 0 or "chain OK" not in out:
                raise FaultError(f"miner-{i}'s chain does not verify:\n{out}")
            heads[i] = out.strip().splitlines()[-1]
        if len(set(heads.values())) != 1:
            raise FaultError(f"the miners end on different heads: {heads}")
        return heads[0]

    def chain(self) -> list[tuple[int, str]]:
        """``chain show`` of miner-0: (block height, line) of every line."""
        db = self.state(MINERS[0]) / "miner-0" / "chain.db"
        command = [sys.executable, str(ROOT / "cli.py"), "chain", "show", "--db", str(db)]
        out = subprocess.run(
            command, check=True, capture_output=True, text=True, cwd=ROOT, timeout=120
        ).stdout
        lines, height = [], 0
        for line in out.splitlines():
            found = re.match(r"block (\d+) ", line)
            if found:
                height = int(found.group(1))
            lines.append((height, line))
        return lines

    def summary_heights(self) -> dict[int, int]:
        """Round -> the height of the block holding its summary."""
        found = {}
        for height, line in self.chain():
            match = re.search(r"#\d+ summary round (\d+):", line)
            if match:
                found[int(match.group(1))] = height
        return found


# The faults -------------------------------------------------------------------------
def _primary_and_backups(net: Network) -> tuple[int, list[int]]:
    primary = net.primary()
    return primary, [(primary + k) % N for k in range(1, N)]


def _kill_and_restart(net: Network, record: Record, host: str) -> Record:
    record.started = net.kill(host)
    time.sleep(DOWN_SECONDS)  # the fault's length
    record.ended = net.start(host)
    return record


def kill_backup(net: Network) -> Record:
    net.wait_round(1)
    primary, backups = _primary_and_backups(net)
    victim = backups[0]
    record = Record("kill -9 and restart of a backup miner", "kill", (MINERS[victim],))
    record.notes = {"victim": victim, "primary": primary}
    return _kill_and_restart(net, record, MINERS[victim])


def kill_primary(net: Network) -> Record:
    net.wait_round(1)
    primary = net.primary()
    record = Record("kill -9 and restart of the primary", "kill", (MINERS[primary],))
    record.notes = {"victim": primary, "primary": primary}
    return _kill_and_restart(net, record, MINERS[primary])


def pause_primary(net: Network) -> Record:
    net.wait_round(1)
    primary = net.primary()
    host = MINERS[primary]
    record = Record("SIGSTOP and SIGCONT of the primary", "outage", (host,))
    record.notes = {"victim": primary, "primary": primary}
    try:
        record.started = net.signal_nodes(host, signal.SIGSTOP)
        time.sleep(OUTAGE_SECONDS)  # the fault's length
    finally:
        record.ended = net.signal_nodes(host, signal.SIGCONT)
    return record


def _cut(net: Network, record: Record) -> Record:
    try:
        for host in record.hosts:
            net.lan.cut(host, down=True)
        record.started = time.time()
        time.sleep(OUTAGE_SECONDS)  # the fault's length
    finally:
        for host in record.hosts:
            net.lan.cut(host, down=False)
        record.ended = time.time()
    return record


def cut_primary(net: Network) -> Record:
    net.wait_round(1)
    primary = net.primary()
    record = Record("the primary's link down and up", "outage", (MINERS[primary],))
    record.notes = {"victim": primary, "primary": primary}
    return _cut(net, record)


def cut_server(net: Network) -> Record:
    net.wait_round(1)
    return _cut(net, Record("the server cut from the miners", "outage", (SERVER,)))


def kill_server(net: Network) -> Record:
    net.wait_round(1)
    return _kill_and_restart(
        net, Record("kill -9 and restart of the server", "kill", (SERVER,)), SERVER
    )


def _reserved(net: Network, host: str, rnd: int) -> list[str]:
    """The clients of ``host`` that logged their reservation of round ``rnd``."""
    pattern = re.compile(rf"\[(client-\d+) r\d+(?: v\d+ h\d+)?\] reserved round {rnd}:")
    return [m.group(1) for line in net.log(host) if (m := pattern.search(line))]


def kill_client(net: Network) -> Record:
    """The client process of the first client host that reserves round 2."""
    rnd = 2

    def reserving() -> tuple[str, list[str]] | None:
        for host in CLIENTS:
            clients = _reserved(net, host, rnd)
            if clients:
                return host, clients
        return None

    host, clients = net.wait_for(reserving, f"a client reserving round {rnd}")
    record = Record("kill -9 and restart of a client process", "kill", (host,))
    record.notes = {"round": rnd, "reserved": clients}
    return _kill_and_restart(net, record, host)


def two_miners_down(net: Network) -> Record:
    """Two backups killed (f = 1: the network stops), then one back (it resumes), then
    the other."""
    net.wait_round(1)
    primary, backups = _primary_and_backups(net)
    victims = backups[:2]
    hosts = tuple(MINERS[v] for v in victims)
    record = Record("two miners down, then one back", "outage", hosts)
    record.notes = {"victims": victims, "primary": primary}
    record.started = time.time()
    for host in hosts:
        net.kill(host)
    time.sleep(OUTAGE_SECONDS)  # the fault's length
    survivors = [i for i in range(N) if i not in victims]
    assert net.watch is not None
    # The network stopped: the survivors' heights did not move in the outage's second half
    late = net.watch.between(record.started + OUTAGE_SECONDS / 2, time.time())
    stalled = {tuple(h[i] for i in survivors) for _, h in late}
    if len(stalled) != 1 or any(net.over(i) for i in survivors):
        raise FaultError(f"with two of four miners down the chain moved on: {sorted(stalled)}")
    height = max(next(iter(stalled)))
    record.notes["stalled_at"] = height
    record.ended = net.start(hosts[0])
    # ... and resumes with three
    net.wait_for(lambda: max(net.heights()) > height, "a block with three miners up")
    record.notes["resumed"] = time.time()
    record.notes["restarted"] = {victims[0]: record.ended, victims[1]: net.start(hosts[1])}
    return record


# What each fault must leave behind (after the run ended and the chains verified) ----
def restarted_from_state(net: Network, record: Record) -> None:
    """A killed miner came back from its chain: its second start was at height > 0."""
    victim = record.notes["victim"]
    starts = [line for line in net.log(f"miner-{victim}") if " listening on " in line]
    if len(starts) != 2 or starts[1].endswith("height 0"):
        raise FaultError(f"miner-{victim} did not resume from its chain: {starts}")


def view_changed(net: Network, record: Record, *, until: float | None = None) -> None:
    """Another miner moved to a view whose primary is not the victim, after the fault
    started (and before ``until``)."""
    victim = record.notes["victim"]
    if net.watch is not None and net.watch.samples:
        before = [h for t, h in net.watch.samples if t <= record.started]
        if before and max(before[-1]) >= max(net.watch.samples[-1][1]):
            return  # every block was committed before the fault: no primary was needed
    for i in range(N):
        if i == victim:
            continue
        for at, view in net.view_changes(i):
            if at >= record.started and (until is None or at <= until) and view % N != victim:
                return
    raise FaultError(f"no view change away from miner-{victim} was logged")


def killed_primary_replaced(net: Network, record: Record) -> None:
    restarted_from_state(net, record)
    view_changed(net, record)


def primary_replaced_during(net: Network, record: Record) -> None:
    view_changed(net, record, until=record.ended + 1)


def server_resumed(net: Network, record: Record) -> None:
    if not any("resuming from round-" in line for line in net.log("server")):
        raise FaultError("the restarted server did not resume from a checkpoint")


def ledger_consistent(net: Network, record: Record) -> None:
    """The killed client host's privacy ledger: no round twice for any record set, the
    round reserved before the kill in it, and every release the chain shows in it."""
    host = record.hosts[0]
    ledger = json.loads((net.state(host) / "privacy-ledger.json").read_text())
    per_round: Counter[int] = Counter()
    for shard, entry in ledger["data"].items():
        rounds = [(r["network"], r["round"]) for r in entry["releases"]]
        if len(rounds) != len(set(rounds)):
            raise FaultError(f"a round entered twice for records {shard[:12]}: {rounds}")
        per_round.update(r for _, r in rounds)
    rnd = record.notes["round"]
    if per_round[rnd] < len(record.notes["reserved"]):
        raise FaultError(f"round {rnd}, reserved before the kill, is missing: {per_round}")
    hosting = " ".join(line for line in net.log(host) if " hosting " in line)
    hosted = set(re.findall(r"client-\d+", hosting))
    released: Counter[int] = Counter()
    rnd_of_block = 0
    for _, line in net.chain():
        found = re.search(r"verdicts round (\d+):", line)
        if found:
            rnd_of_block = int(found.group(1))
        verdict = re.match(r"\s+(client-\d+) (ACCEPT|REJECT) ", line)
        if verdict and verdict.group(1) in hosted:
            released[rnd_of_block] += 1
    short = {r: n for r, n in released.items() if per_round[r] < n}
    if short:
        raise FaultError(f"releases on the chain missing from the ledger: {short} ({per_round})")


def two_down_stopped(net: Network, record: Record) -> None:
    for victim in record.notes["victims"]:
        restarted_from_state(net, Record("", "", notes={"victim": victim}))


@dataclass(frozen=True)
class Fault:
    apply: Callable[[Network], Record]
    after: Callable[[Network, Record], None]


FAULTS: dict[str, Fault] = {
    "kill-backup": Fault(kill_backup, restarted_from_state),
    "kill-primary": Fault(kill_primary, killed_primary_replaced),
    "pause-primary": Fault(pause_primary, primary_replaced_during),
    "cut-primary": Fault(cut_primary, primary_replaced_during),
    "cut-server": Fault(cut_server, lambda net, record: None),
    "kill-server": Fault(kill_server, server_resumed),
    "kill-client": Fault(kill_client, ledger_consistent),
    "two-miners-down": Fault(two_miners_down, two_down_stopped),
}


def run_fault(
    lan: Lan, root: Path, data_dir: Path, name: str, *, linger: bool = False
) -> tuple[Network, Record, str]:
    """A fresh network under ``root`` with fault ``name``: started, faulted, ended,
    every chain verified on one head, the fault's own check passed."""
    net = Network(lan, root, data_dir)
    net.start_all()
    try:
        record = FAULTS[name].apply(net)
        net.finish(linger=linger)
    finally:
        if net.watch is not None:
            net.watch.stop()
    head = net.verify()
    FAULTS[name].after(net, record)
    return net, record, head
