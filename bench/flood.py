"""An outsider floods the miners: how much slower are the rounds, and is the memory given back?

Runs a small local network with the ``network up`` launcher (4 miners, 6
clients in 2 processes, the CNN, 10 rounds). Rounds 2-4 are the unattacked baseline. Once
round 4 is summarised an attacker with no key of the genesis, on
127.0.0.1 only, floods every miner until round 7 is summarised (bounded:
at most ``--waves`` waves):

- each wave (at most one a second), on every miner, 15 PRE-PREPAREs of
  3.5 MiB each, well-formed but signed by no member (one ``Miner/Deliver``
  call each);
- 500 ``Miner/SubmitUpdate`` streams to miner-0, opened at once: each
  sends a header that declares the model's full size (unsigned), then
  waits for the miner to end it.

Prints JSON: each round's seconds (the server's own timing), the ratio of
the attacked rounds (5-7) to the baseline (2-4) (target at most 1.5; before
signature-first checks, no round ended for 31 s), the status codes the
attacker got, the attacker's own CPU use (it shares the 2 cores with the
nodes here; on a LAN it would not), and miner-0's resident memory before the attack, at its peak
and after the streams ended (target: back within 50 MB; before, +317 MB
stayed).

    python bench/flood.py --data-dir data
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import hashlib
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc

from chain.digests import model_spec, nbytes_of
from chain.models import initial_weights
from commands.launcher import NodeProcess, network_up
from commands.progress import LineView
from consensus.ledger import GENESIS_HASH, Block, BlockHeader, Request, encode_batch
from consensus.messages import PrePrepare
from fl.config import RunConfig
from node.genesis import read_genesis
from node.identity import Identity
from proto import llbcfl_pb2 as pb
from proto import llbcfl_pb2_grpc as pb_grpc

CONFIG = {
    "model": "cnn",
    "train_size": 12_000,
    "clients": 6,
    "frac": 0.5,
    "rounds": 10,
    "val_size": 200,
    "test_size": 500,
}
BASELINE = (2, 3, 4)
ATTACKED = (5, 6, 7)
PRE_PREPARES_PER_MINER = 15
PRE_PREPARE_BYTES = 3_500 * 1024
IDLE_STREAMS = 500
TARGET = "miner-0"


def summarised(run_dir: Path) -> int:
    """The last round the server reported done (0: none yet)."""
    try:
        return int(json.loads((run_dir / "server" / "progress.json").read_text())["round"])
    except (OSError, ValueError, KeyError):
        return 0


def rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` in MB (from /proc; NaN once it has exited)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return float("nan")
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def forged_pre_prepare(view: int, height: int) -> bytes:
    """A well-formed PRE-PREPARE of a 3.5 MiB block, signed by a key outside the genesis."""
    outsider = Identity.generate(node_id="outsider", role="miner")
    count = PRE_PREPARE_BYTES // (64 * 1024)
    filler = [Request("client-000", i, os.urandom(64 * 1024), b"\0" * 64) for i in range(count)]
    payload = encode_batch(filler)
    header = BlockHeader(
        height=height,
        previous_hash=GENESIS_HASH,
        view=view,
        proposer=0,
        payload_digest=hashlib.sha256(payload).digest(),
    )
    message = PrePrepare(view=view, height=height, block=Block(header, payload), sender=0)
    message.signature = outsider._sign_raw(message.signed)
    return message.encode()


class Attacker:
    """The flood, in its own thread and event loop; bounded in waves and streams."""

    def __init__(self, run_dir: Path, *, waves: int) -> None:
        self.run_dir = run_dir
        self.waves = waves
        self.codes: collections.Counter[str] = collections.Counter()
        self.pid: int | None = None
        self.memory: dict[str, float] = {}
        self.window: tuple[float, float] | None = None
        self.cpu_seconds = 0.0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def started(self, procs: list[NodeProcess]) -> None:
        self.pid = next(p.pid for p in procs if p.name == TARGET)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.is_set() and summarised(self.run_dir) < BASELINE[-1]:
            time.sleep(0.05)  # polling another process's progress file
        if self.done.is_set() or self.pid is None:
            return
        genesis = read_genesis(self.run_dir / "genesis.toml")
        addresses = {m.node_id: m.address for m in genesis.membership.miners}
        spec = model_spec(initial_weights(genesis.run))
        self.memory["before_mb"] = rss_mb(self.pid)
        start = time.monotonic()
        cpu = time.process_time()  # the attacker's own CPU (this process, all threads)
        asyncio.run(self._flood(addresses, spec))
        self.window = (start, time.monotonic())
        self.cpu_seconds = time.process_time() - cpu
        # The streams are over: wait for the next round, then read the memory again.
        settle = summarised(self.run_dir) + 1
        give_up = time.monotonic() + 60
        while summarised(self.run_dir) < settle and time.monotonic() < give_up:
            if self.done.wait(0.05):
                break
        self.memory["after_mb"] = rss_mb(self.pid)

    async def _flood(self, addresses: dict[str, str], spec: Any) -> None:
        data = forged_pre_prepare(view=0, height=1)
        stop = asyncio.Event()
        streams = asyncio.create_task(self._idle_streams(addresses[TARGET], spec, stop))
        sampler = asyncio.create_task(self._sample_memory(stop))
        waves = 0
        while waves < self.waves and summarised(self.run_dir) < ATTACKED[-1]:
            pace = asyncio.create_task(asyncio.sleep(1.0))  # at most one wave a second
            await asyncio.gather(*(self._pre_prepares(a, data) for a in addresses.values()))
            await pace
            waves += 1
        self.memory["waves"] = waves
        stop.set()
        await asyncio.gather(streams, sampler)

    async def _pre_prepares(self, address: str, data: bytes) -> None:
        async with grpc.aio.insecure_channel(address) as ch:
            stub = pb_grpc.MinerStub(ch)
            for _ in range(PRE_PREPARES_PER_MINER):
                try:
                    await stub.Deliver(iter([pb.PbftMessage(data=data)]), timeout=10)
                    self.codes["deliver OK"] += 1
                except grpc.aio.AioRpcError as exc:
                    self.codes[f"deliver {exc.code().name}"] += 1

    async def _idle_streams(self, address: str, spec: Any, stop: asyncio.Event) -> None:
        names = sorted(spec)
        header = pb.TensorStreamHeader(
            round=1,
            sender_id="client-000",
            tensors=[pb.TensorSpec(name=n, dtype=spec[n][0], shape=spec[n][1]) for n in names],
            total_bytes=sum(nbytes_of(*spec[n]) for n in names),
            num_samples=1,
        )

        async def parts() -> Any:
            yield pb.TensorStreamPart(header=header)
            await stop.wait()

        async def one(stub: Any) -> None:
            try:
                await stub.SubmitUpdate(parts(), timeout=60)
                self.codes["stream OK"] += 1
            except grpc.aio.AioRpcError as exc:
                self.codes[f"stream {exc.code().name}"] += 1

        async with grpc.aio.insecure_channel(address) as ch:
            stub = pb_grpc.MinerStub(ch)
            calls = [asyncio.create_task(one(stub)) for _ in range(IDLE_STREAMS)]
            await stop.wait()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 30)

    async def _sample_memory(self, stop: asyncio.Event) -> None:
        peak = 0.0
        while not stop.is_set():
            assert self.pid is not None
            peak = max(peak, rss_mb(self.pid))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.2)
        self.memory["peak_mb"] = peak


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--waves", type=int, default=20, help="most PRE-PREPARE waves")
    parser.add_argument("--timeout", type=float, default=900.0, help="whole run, seconds")
    parser.add_argument("--run-dir", default=None)
    args = parser.parse_args()
    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="flood-")) / "run"
    config = RunConfig(**CONFIG, data_dir=args.data_dir)
    attacker = Attacker(run_dir, waves=args.waves)
    try:
        doc = network_up(
            config,
            run_dir=run_dir,
            miners=4,
            client_procs=2,
            protocol={},
            # Plaintext: with mutual TLS an outsider's connection ends in the handshake;
            # this bench measures what the application layer costs when it gets in.
            tls=False,
            view=LineView(sys.stderr),
            timeout=args.timeout,
            on_started=attacker.started,
        )
    finally:
        attacker.done.set()
        if attacker.thread.is_alive():
            attacker.thread.join(timeout=120)
    seconds = {r["round"]: r["seconds"] for r in doc["rounds"]}
    base = mean([seconds[r] for r in BASELINE])
    hit = mean([seconds[r] for r in ATTACKED])
    memory = attacker.memory
    out = {
        "run_dir": str(run_dir),
        "round_seconds": {r: round(s, 2) for r, s in seconds.items()},
        "baseline_rounds": list(BASELINE),
        "attacked_rounds": list(ATTACKED),
        "attacked_over_baseline": round(hit / base, 3),
        "attack_seconds": (
            round(attacker.window[1] - attacker.window[0], 1) if attacker.window else None
        ),
        "attacker_cpu_cores": (
            round(attacker.cpu_seconds / (attacker.window[1] - attacker.window[0]), 2)
            if attacker.window
            else None
        ),
        "attacker_status_codes": dict(sorted(attacker.codes.items())),
        "miner0_memory_mb": {k: round(v, 1) for k, v in memory.items()},
        "memory_kept_mb": (
            round(memory["after_mb"] - memory["before_mb"], 1)
            if "after_mb" in memory and "before_mb" in memory
            else None
        ),
        "accuracy": [round(r["accuracy"], 4) for r in doc["rounds"]],
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
