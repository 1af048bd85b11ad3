"""Where a miner does its CPU-heavy work, so that its event loop keeps answering.

Validation of a round (seconds for 20 updates) runs in one worker process:
a thread would still share the interpreter lock with the event loop, and
``Node.Status`` calls then waited up to half a second behind it. Lighter
work that must update the miner's own objects (aggregating the next round's
model, warming the privacy accounting) runs on one worker thread, at a lower
scheduling priority than the loop.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import sys
import threading
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

# The event loop and a worker thread hand the interpreter lock back and forth
# at every await; Python's default 5 ms switch interval makes each handover slow.
GIL_SWITCH_SECONDS = 0.0005
WORKER_NICENESS = 10


def _lower_priority() -> None:
    sys.setswitchinterval(GIL_SWITCH_SECONDS)
    with contextlib.suppress(OSError, AttributeError):  # Linux threads have their own nice
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WORKER_NICENESS)


def worker_thread(name: str) -> ThreadPoolExecutor:
    """One thread, below the event loop's priority."""
    return ThreadPoolExecutor(1, thread_name_prefix=name, initializer=_lower_priority)


def worker_process() -> ProcessPoolExecutor:
    """One worker process, spawned (a process with gRPC threads must never fork)."""
    spawn = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(1, mp_context=spawn, initializer=_lower_priority)
