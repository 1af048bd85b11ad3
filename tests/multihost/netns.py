"""Test hosts as Linux network namespaces on one bridge (addresses in 198.18.0.0/15 only).

:class:`Lan` creates a bridge in the root namespace and, per host, a
namespace with one end of a veth pair (the other end on the bridge), its
address and loopback up. Processes run in a host with :meth:`Lan.spawn`
(``ip netns exec``, a session of their own). :meth:`Lan.close` kills every
process it started (by pid, their whole session), then deletes every
namespace and the bridge by name: it runs even when the test failed, and
deleting a namespace also deletes its veth pair.

Needs root and ``ip``; :func:`unavailable` says why not, for a skip.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from typing import Any

PREFIX = "198.18.0."


def unavailable() -> str | None:
    """Why namespaces cannot be used here (None: they can)."""
    if os.geteuid() != 0:
        return "needs root (ip netns)"
    if shutil.which("ip") is None:
        return "needs the ip command (iproute2)"
    probe = f"llbprobe{os.getpid() % 100000}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


class Lan:
    """A bridge and one namespace per host; every name carries this process's id."""

    def __init__(self) -> None:
        self.tag = f"{os.getpid() % 100000}"
        self.bridge = f"llbbr{self.tag}"
        self.hosts: dict[str, str] = {}  # address -> namespace
        self.links: dict[str, str] = {}  # address -> its veth end on the bridge
        self.processes: list[subprocess.Popen] = []
        ip("link", "add", self.bridge, "type", "bridge")
        ip("link", "set", self.bridge, "up")

    def add_host(self, address: str) -> str:
        """A namespace holding ``address`` (in 198.18.0.0/24), linked to the bridge."""
        assert address.startswith(PREFIX), address
        index = len(self.hosts)
        ns, outside, inside = (f"llb{self.tag}h{index}", f"llv{self.tag}h{index}", "eth0")
        ip("netns", "add", ns)
        self.hosts[address] = ns
        ip("link", "add", outside, "type", "veth", "peer", "name", f"llp{self.tag}h{index}")
        ip("link", "set", f"llp{self.tag}h{index}", "netns", ns)
        ip("-n", ns, "link", "set", f"llp{self.tag}h{index}", "name", inside)
        ip("-n", ns, "addr", "add", f"{address}/24", "dev", inside)
        ip("-n", ns, "link", "set", inside, "up")
        ip("-n", ns, "link", "set", "lo", "up")
        ip("link", "set", outside, "master", self.bridge)
        ip("link", "set", outside, "up")
        self.links[address] = outside
        return ns

    def cut(self, address: str, *, down: bool) -> None:
        """Take host ``address``'s link to the bridge down (or up again)."""
        ip("link", "set", self.links[address], "down" if down else "up")

    def spawn(self, address: str, command: list[str], **options: Any) -> subprocess.Popen:
        """``command`` in host ``address``'s namespace, in a session of its own."""
        argv = ["ip", "netns", "exec", self.hosts[address], *command]
        process = subprocess.Popen(argv, start_new_session=True, **options)
        self.processes.append(process)
        return process

    def close(self) -> None:
        """Stop every process (SIGTERM to each session, then SIGKILL to whatever still
        runs in a namespace, by pid), then delete the namespaces and the bridge."""
        for process in self.processes:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)  # a bundle runner stops its nodes
        for process in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=20)
        for ns in self.hosts.values():
            for pid in self.pids_in(ns):  # nodes of a runner that did not stop them
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for process in self.processes:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=10)
        for ns in self.hosts.values():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)

    @staticmethod
    def pids_in(ns: str) -> list[int]:
        """The processes running in namespace ``ns``."""
        out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout
        return [int(pid) for pid in out.split()]

    def leftovers(self) -> list[str]:
        """Namespaces and links of this Lan still present, and processes it started that
        still run (for the test's own check)."""
        names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
        left = [
            name
            for name in (*self.hosts.values(), self.bridge)
            if name in names or f" {name}:" in links or f" {name}@" in links
        ]
        return left + [f"pid {p.pid}" for p in self.processes if p.poll() is None]
