"""Kernel tests run the Triton kernels on CPU tensors through the Triton interpreter.

`triton.jit` chooses the interpreter when a kernel is defined, so TRITON_INTERPRET must be set before
`kernels.triton.*` is first imported. Conftest modules load before any test module runs, and only
these tests (or LORASERVE_KERNELS=triton) import the kernel modules. The other tests run the torch path
(`auto` on CPU tensors), which this setting does not touch.
"""

from __future__ import annotations

import os

import pytest

os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture
def triton_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """`kernels.ops` takes the Triton implementations for this test (through the interpreter)."""
    monkeypatch.setenv("LORASERVE_KERNELS", "triton")
