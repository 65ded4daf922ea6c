"""Kernel tests run the Triton kernels on CPU tensors through the Triton interpreter (TRITON_INTERPRET is
set by tests/conftest.py, before any test module can import the kernel modules)."""

from __future__ import annotations

import pytest


@pytest.fixture
def triton_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """`kernels.ops` takes the Triton implementations for this test (through the interpreter)."""
    monkeypatch.setenv("LORASERVE_KERNELS", "triton")
