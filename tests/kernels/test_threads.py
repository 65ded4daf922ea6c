"""kernels.threads: the threads beside the engine's make no OpenMP team (`serial_thread`), and work done before
the engine starts leaves none behind (`in_passing_thread`). Threads are counted in subprocesses, through /proc."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kernels import threads

SIDE_THREAD = """
import os, sys, threading
import kernels
import torch
from kernels.threads import serial_thread
torch.set_num_threads(2)
torch.ones(1 << 22).add_(torch.ones(1 << 22))  # the main thread's OpenMP team exists first
before = len(os.listdir("/proc/self/task"))
done, seen = threading.Event(), []
def side():
    if sys.argv[1] == "1":
        serial_thread()
    torch.ones(1 << 22).add_(torch.ones(1 << 22))  # a parallel torch loop on the side thread
    seen.append(len(os.listdir("/proc/self/task")))
    done.wait()
threading.Thread(target=side, daemon=True).start()
while not seen:
    pass
print(seen[0] - before)
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads through Linux's /proc")
def test_a_serial_side_thread_makes_no_openmp_team(tmp_path):
    """A thread beside the main one runs a parallel torch loop: without serial_thread() it gets an OpenMP worker
    of its own (one thread more than itself), with it none."""
    script = tmp_path / "side.py"
    script.write_text(SIDE_THREAD)
    root = Path(__file__).resolve().parents[2]
    grown = [int(subprocess.run([sys.executable, str(script), flag], capture_output=True, text=True, check=True,
                                cwd=root, env={**os.environ, "PYTHONPATH": str(root)}).stdout) for flag in "01"]
    assert grown == [2, 1]


PASSING_THREAD = """
import os, sys, time
import kernels
import torch
from kernels.threads import in_passing_thread
torch.set_num_threads(2)
before = len(os.listdir("/proc/self/task"))
def work():
    torch.ones(1 << 22).add_(torch.ones(1 << 22))  # a parallel torch loop: an OpenMP team for its thread
    return 7
got = in_passing_thread(work) if sys.argv[1] == "1" else work()
deadline = time.monotonic() + 2.0  # an ended thread's workers leave a moment after it: wait for them
while len(os.listdir("/proc/self/task")) > before and time.monotonic() < deadline:
    time.sleep(0.01)
print(got, len(os.listdir("/proc/self/task")) - before)
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads through Linux's /proc")
def test_work_in_a_passing_thread_leaves_no_openmp_worker_behind(tmp_path):
    """The main thread's parallel op leaves an OpenMP worker that lives on (one thread more); the same op through
    in_passing_thread returns its result and leaves none: its thread and the thread's team are gone."""
    script = tmp_path / "passing.py"
    script.write_text(PASSING_THREAD)
    root = Path(__file__).resolve().parents[2]
    out = [subprocess.run([sys.executable, str(script), flag], capture_output=True, text=True, check=True, cwd=root,
                          env={**os.environ, "PYTHONPATH": str(root)}).stdout.split() for flag in "01"]
    assert out == [["7", "1"], ["7", "0"]]


def test_in_passing_thread_raises_what_the_work_raised_on_the_callers_thread():
    def fail():
        raise ValueError("no such model file: /nowhere.gguf")

    with pytest.raises(ValueError, match="no such model file"):
        threads.in_passing_thread(fail)
