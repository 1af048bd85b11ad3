"""The miner's worker process never outlives the miner, even one killed with SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PARENT = """
import os, time
from node.workers import worker_process
pool = worker_process()
print(pool.submit(os.getpid).result(), flush=True)
time.sleep(120)
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_the_worker_process_dies_with_a_killed_miner() -> None:
    # Prepare: a stand-in miner that started its worker process
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    worker = 0
    try:
        assert parent.stdout is not None
        worker = int(parent.stdout.readline())
        assert alive(worker)
        # Execute: the miner is killed without any chance to clean up
        parent.kill()
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while alive(worker) and time.monotonic() < deadline:
            time.sleep(0.05)  # polling the kernel's process table, bounded
        # Assert
        assert not alive(worker)
    finally:
        if parent.poll() is None:
            parent.kill()
        if worker and alive(worker):
            os.kill(worker, signal.SIGKILL)
