"""A live ``cli.py network up`` run for attacks, and every process a test touches in it.

:class:`LiveNetwork` starts ``network up`` (a real process, which starts one
process per node on 127.0.0.1) and reads its ``pids.json``; a test can then
freeze (SIGSTOP) and thaw a node process, stop a miner and start it again
with its own command, wait for a condition with a bound
(:func:`wait_until`), wait for the run to end, and run ``cli.py chain
verify`` on every miner's chain. :meth:`LiveNetwork.close` runs on success
and failure alike: it thaws what it froze, interrupts ``network up`` if it
still runs (it then stops every node it started) and stops by pid every
process the test started itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, str(ROOT / "cli.py")]
T = TypeVar("T")


def wait_until(condition: Callable[[], T], *, timeout: float, what: str) -> T:
    """The first truthy value of ``condition()``, polled; the test fails after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"gave up after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)  # polling other processes (a condition with a bound), not a race


def option_args(options: dict[str, Any]) -> list[str]:
    return [
        f"--{k.replace('_', '-')}" if v is True else f"--{k.replace('_', '-')}={v}"
        for k, v in options.items()
    ]


def exited(pid: int) -> bool:
    """True once ``pid`` is gone or a zombie (another process's child need not be reaped yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


class LiveNetwork:
    """One ``network up`` run under ``run_dir``, with the options given."""

    def __init__(self, run_dir: Path, *, mnist_root: Path, options: dict[str, Any]) -> None:
        self.run_dir = run_dir
        self.mnist_root = mnist_root
        self.options = options
        self.process: subprocess.Popen | None = None
        self.nodes: dict[str, dict[str, Any]] = {}
        self.frozen: set[int] = set()
        self.started: list[subprocess.Popen] = []  # processes the test started itself
        self._files: list[Any] = []
        self.output_path = run_dir.parent / "network-up.out"

    def start(self, *, freeze: tuple[str, ...] = ()) -> None:
        """Start ``network up``; freeze the node processes named in ``freeze`` as soon as
        they exist (before they import anything, so before they talk to any node)."""
        env = {**os.environ, "LLBCFL_DATA": str(self.mnist_root)}
        # Plaintext: this suite attacks the application layer, which must hold by
        # itself (a member's valid certificate gets past TLS); tests/node/test_tls.py
        # covers what mutual TLS refuses.
        command = [*CLI, "network", "up", "--insecure", *option_args(self.options)]
        command += ["--run-dir", str(self.run_dir), "--quiet"]
        self._files.append(open(self.output_path, "wb"))  # noqa: SIM115 - closed in close()
        self.process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=self._files[-1], stderr=subprocess.STDOUT
        )
        pids = self.run_dir / "pids.json"
        wait_until(
            lambda: pids.exists() or self.process.poll() is not None,
            timeout=60,
            what="network up to start its nodes",
        )
        assert pids.exists(), self.output()
        self.nodes = json.loads(pids.read_text())
        for name in freeze:
            self.freeze(name)

    def pid(self, name: str) -> int:
        return int(self.nodes[name]["pid"])

    def output(self) -> str:
        return self.output_path.read_text(errors="replace")

    def log(self, name: str) -> str:
        return (self.run_dir / name / "log").read_text(errors="replace")

    # Node processes

    def freeze(self, name: str) -> None:
        os.kill(self.pid(name), signal.SIGSTOP)
        self.frozen.add(self.pid(name))

    def thaw(self, name: str) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid(name), signal.SIGCONT)
        self.frozen.discard(self.pid(name))

    def stop_node(self, name: str) -> None:
        """SIGTERM one node of ``network up`` and wait (bounded) until it has exited."""
        pid = self.pid(name)
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda: exited(pid), timeout=30, what=f"{name} (pid {pid}) to exit")

    def restart(self, name: str) -> subprocess.Popen:
        """Start ``name`` again with the command ``network up`` used (its log appended)."""
        log = open(self.run_dir / name / "log", "ab")  # noqa: SIM115 - closed in close()
        self._files.append(log)
        process = subprocess.Popen(
            self.nodes[name]["command"],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.started.append(process)
        return process

    # The end of the run

    def finish(self, *, timeout: float) -> str:
        """Wait for ``network up`` to exit; its output. Fails unless it exits 0 in time."""
        assert self.process is not None
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"network up did not finish within {timeout:.0f} s:\n{self.output()}")
        assert self.process.returncode == 0, self.output()
        return self.output()

    def metrics(self) -> dict[str, Any]:
        return json.loads((self.run_dir / "metrics.json").read_text())

    def verify_chains(self, miners: list[str]) -> dict[str, subprocess.CompletedProcess]:
        """``cli.py chain verify`` on every miner's chain (the processes run side by side)."""
        genesis = str(self.run_dir / "genesis.toml")
        running = {
            miner: subprocess.Popen(
                [
                    *CLI,
                    "chain",
                    "verify",
                    "--genesis",
                    genesis,
                    "--db",
                    str(self.run_dir / miner / "chain.db"),
                ],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for miner in miners
        }
        results = {}
        for miner, process in running.items():
            try:
                out, _ = process.communicate(timeout=120)
            finally:
                if process.poll() is None:
                    process.kill()
                    process.wait()
            results[miner] = subprocess.CompletedProcess(process.args, process.returncode, out)
        return results

    def close(self) -> None:
        """Thaw, interrupt ``network up`` if it still runs, stop what the test started."""
        for pid in list(self.frozen):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self.frozen.clear()
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # network up stops every node it started
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for process in self.started:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        for f in self._files:
            f.close()
        self._files.clear()


@contextlib.contextmanager
def running(
    run_dir: Path, *, mnist_root: Path, options: dict[str, Any], freeze: tuple[str, ...] = ()
) -> Iterator[LiveNetwork]:
    """A started :class:`LiveNetwork` (``freeze``: processes stopped from the start),
    closed on exit whatever happened."""
    net = LiveNetwork(run_dir, mnist_root=mnist_root, options=options)
    try:
        net.start(freeze=freeze)
        yield net
    finally:
        net.close()
