"""Kernel tests run the Triton kernels on CPU tensors through the Triton interpreter (TRITON_INTERPRET is
set by tests/conftest.py, before any test module can import the kernel modules)."""

from __future__ import annotations

