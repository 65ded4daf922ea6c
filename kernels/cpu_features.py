"""What the CPU multiplies natively, read once: the bf16 paths choose their matmul dtype from it.

On a CPU without bf16 dot-product instructions (AVX512-BF16 or AMX-BF16 on x86, BF16 on Arm) torch's bf16
matmuls are emulated: on a 2-core AVX2 machine a 576x1536 weight ran 18 GFLOP/s in bf16 against 155 in
float32 at M = 256 (and 17 against 66 at M = 16). There the bf16 model's matrix products (the dense weight
copies, the dequantizing matmul, attention's products, LoRA's) run in float32: bf16 in, bf16 out, products
and sums in float32.
"""

from __future__ import annotations

import torch

_NATIVE_BF16: bool | None = None


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux reports them (x86 `flags`, Arm `Features`); empty elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        pass
    return set()


def native_bf16() -> bool:
    """Whether this CPU has bf16 dot-product instructions (where the flags cannot be read: False, since a
    float32 matmul is never the slow one)."""
    global _NATIVE_BF16
    if _NATIVE_BF16 is None:
        _NATIVE_BF16 = bool(cpu_flags() & {"avx512_bf16", "amx_bf16", "bf16"})
    return _NATIVE_BF16


def matmul_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype to multiply `t` in: float32 for a bf16 CPU tensor where bf16 is not native, else its own."""
    if t.dtype == torch.bfloat16 and t.is_cpu and not native_bf16():
        return torch.float32
    return t.dtype
