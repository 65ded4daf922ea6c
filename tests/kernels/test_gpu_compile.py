"""Every launch configuration of the Triton wrappers compiles for a CUDA GPU (see gpu_compile.py).

Marked `interpreter` with the other Triton tests: it needs no GPU, but takes ~20 s of CPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.interpreter
def test_every_launch_configuration_compiles_for_sm80(tmp_path):
    # a process without the interpreter (this one has it on), compiling into a fresh cache
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-m", "tests.kernels.gpu_compile"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr[-6000:]
    assert "compiled" in r.stdout and " of 0 " not in r.stdout, r.stdout
