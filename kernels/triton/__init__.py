"""Triton implementations of the kernel ops (the GPU path); `kernels.ops` chooses them per call.

Nothing is imported here: `triton.jit` decides at decoration time whether a kernel runs compiled or through
the interpreter (`TRITON_INTERPRET=1`), so the kernel modules are imported only when first used.
"""
