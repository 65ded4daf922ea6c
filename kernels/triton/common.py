"""What the Triton wrappers share: dtype mapping, the dot operand dtype, the interpreter check."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

FLOAT_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
# tl.dot needs K >= 16 on the GPU (the interpreter takes anything); M and N of 16 fill whole MMA tiles.
# Every tile edge is at least this big, masked past the data.
MIN_DOT = 16


def interpreting() -> bool:
    return bool(triton.knobs.runtime.interpret)


def float_dtype(t: torch.Tensor, what: str) -> tl.dtype:
    """The Triton dtype of a float16/bfloat16/float32 tensor; TypeError for anything else."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{what} has dtype {t.dtype}: supported are float16, bfloat16, float32")
    return FLOAT_DTYPES[t.dtype]


def dot_dtype(*dtypes: torch.dtype) -> tuple[tl.dtype, str]:
    """(dtype tl.dot operands are cast to, input precision) for operands loaded in `dtypes`.

    One 16-bit dtype: the tensor-core path in that dtype (fp32 accumulation). Anything with float32, or
    mixed 16-bit dtypes: float32 at IEEE precision (not tf32), so the fp32 model stays exact. The
    interpreter keeps bfloat16 as raw uint16 and only converts it correctly: bf16 operands go through fp32.
    """
    kinds = set(dtypes)
    if len(kinds) == 1 and torch.float32 not in kinds and not (interpreting() and torch.bfloat16 in kinds):
        return FLOAT_DTYPES[kinds.pop()], "tf32"  # precision applies to fp32 operands only
    return tl.float32, "ieee"


def check_device(what: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{what} is on {t.device}, the other operands on {device}")


def check_launchable(kernel: object, device: torch.device) -> None:
    """CPU tensors run only through the interpreter, which must have been on when the kernel was defined."""
    if device.type == "cpu" and not isinstance(kernel, InterpretedFunction):
        raise RuntimeError(
            "Triton kernels on CPU tensors need the interpreter: set TRITON_INTERPRET=1 before "
            "kernels.triton is first imported"
        )


def block(n: int, lo: int = MIN_DOT, hi: int = 64) -> int:
    """A power-of-two tile edge covering n, clamped to [lo, hi]."""
    return max(lo, min(hi, triton.next_power_of_2(max(1, n))))
