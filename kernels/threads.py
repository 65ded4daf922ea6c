"""OpenMP teams and the threads beside the engine's.

libgomp (torch's OpenMP runtime, which the C kernels of `kernels.native` share) keeps an OpenMP team for every
thread that ever ran a parallel region on more than one thread; an idle worker of a team lives as long as its
thread. Once the teams' threads outnumber the CPUs, libgomp cuts how long idle workers spin before they sleep
(kernels/__init__.py keeps that from dropping to nothing), and each of an engine step's hundreds of parallel
regions pays for waking a sleeping worker. So the engine's thread should be the only one with a team: threads
beside it run their torch ops on themselves alone (`serial_thread`), and heavy work before the engine starts
runs on a thread that ends (`in_passing_thread`).
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable
from typing import TypeVar

import torch


def serial_thread() -> None:
    """Make the calling thread run torch's parallel ops on itself alone (for the threads beside the engine's:
    adapter loads, grammar work, RPC handlers).

    A thread that runs a parallel op gets an OpenMP team of its own, whose idle worker lives as long as the
    thread; once the teams' threads outnumber the CPUs, OpenMP cuts how long idle workers spin, and every
    parallel region of the engine pays for waking its workers (decode steps of 64 requests measured 1.15-1.6x
    slower after one adapter load; kernels/__init__.py keeps that spin from dropping to nothing). With one
    thread per region here, no team is made. Only this thread's OpenMP setting changes, not torch's global
    count (which the engine's thread reads). It covers torch's own parallel loops (copies, casts, elementwise
    ops: what these threads run); a BLAS matrix product keeps the library's thread count."""
    torch.get_num_threads()  # torch's own per-thread OpenMP setup first: it would undo what follows
    omp = _libgomp()
    if omp is not None:
        omp.omp_set_num_threads(1)


T = TypeVar("T")


def in_passing_thread(fn: Callable[[], T]) -> T:
    """fn() on a thread of its own that ends when fn returns; its result, or what it raised. For the heavy torch
    work done before an engine starts on another thread (loading and preparing the model): that thread's OpenMP
    team leaves with it.

    Each thread that runs a parallel torch op (or C kernel) on more than one thread keeps an OpenMP team whose
    worker lives as long as the thread; with two such threads on a 2-CPU machine the teams' threads outnumber
    the CPUs, libgomp cuts every idle worker's spin to ~1,000 rounds (kernels/__init__.py) and each of a step's
    hundreds of parallel regions wakes a sleeping worker. A server that loaded its model on the main thread (which
    lives on) and ran the engine on its loop thread took 138-163 ms (medians of 10) for the prefill of a 55-token
    prompt that took 105-127 ms with the model loaded on a passing thread (one process per run, alternating)."""
    box: list = []

    def run() -> None:
        try:
            box.append((True, fn()))
        except BaseException as e:  # handed to the caller's thread
            box.append((False, e))

    thread = threading.Thread(target=run, name="loader")
    thread.start()
    thread.join()
    ok, value = box[0]
    if not ok:
        raise value
    return value


_gomp: list[ctypes.CDLL | None] = []


def _libgomp() -> ctypes.CDLL | None:
    """The OpenMP runtime torch loaded (by its soname, already in the process), or None without one."""
    if not _gomp:
        try:
            _gomp.append(ctypes.CDLL("libgomp.so.1"))
        except OSError:
            _gomp.append(None)
    return _gomp[0]
