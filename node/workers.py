"""Where a miner does its CPU-heavy work, so that its event loop keeps answering.

Validation of a round (seconds for 20 updates) runs in one worker process:
a thread would still share the interpreter lock with the event loop, and
``Node.Status`` calls then waited up to half a second behind it. On a
machine with more than one core the worker process stays off the first
one, which is left to the event loops (on 2 cores this took the p99 of
``Node.Status`` during validation from 162 ms to 65 ms, for rounds about a
fifth longer when 4 miners share the machine). Lighter
work that must update the miner's own objects (aggregating the next round's
model, warming the privacy accounting) runs on one worker thread, at a lower
scheduling priority than the loop.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import sys
import threading
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

# The event loop and a worker thread hand the interpreter lock back and forth
# at every await; Python's default 5 ms switch interval makes each handover slow.
GIL_SWITCH_SECONDS = 0.0005
WORKER_NICENESS = 10
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _lower_priority() -> None:
    sys.setswitchinterval(GIL_SWITCH_SECONDS)
    with contextlib.suppress(OSError, AttributeError):  # Linux threads have their own nice
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WORKER_NICENESS)


def worker_thread(name: str) -> ThreadPoolExecutor:
    """One thread, below the event loop's priority."""
    return ThreadPoolExecutor(1, thread_name_prefix=name, initializer=_lower_priority)


def _worker_process_init(parent: int) -> None:
    """Die with the miner (even on kill -9), and run below its priority."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the miner died before the line above
        os._exit(0)
    _lower_priority()
    with contextlib.suppress(OSError, AttributeError):  # leave the first core to event loops
        cores = os.sched_getaffinity(0)
        if len(cores) > 1:
            os.sched_setaffinity(0, cores - {min(cores)})


def worker_process() -> ProcessPoolExecutor:
    """One worker process, spawned (a process with gRPC threads must never fork).

    The kernel sends it SIGTERM when the miner that started it dies, so a
    killed miner leaves no worker behind.
    """
    spawn = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(
        1, mp_context=spawn, initializer=_worker_process_init, initargs=(os.getpid(),)
    )
