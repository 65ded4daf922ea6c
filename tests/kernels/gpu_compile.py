"""Compile every launch configuration the Triton wrappers produce for a CUDA GPU (sm_80, or `--arch N`), without
a GPU.

The interpreter runs any Triton program numpy can run; the GPU compiler is stricter (tl.dot needs every
reduction dimension >= 16, types must agree, no early return inside loops ...). This script runs each wrapper on
representative CPU inputs with the kernel launch replaced by a recorder, then compiles each distinct
(kernel, argument types, constexprs) it recorded down to a cubin. Run in a process where TRITON_INTERPRET
is unset (the interpreter replaces parts of triton.language): `python -m tests.kernels.gpu_compile [--arch 90]`.
Exits 1, naming the configuration, when one fails to compile.
"""

from __future__ import annotations

import sys
import traceback

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kernels.attention import AttentionPlan
from kernels.lora import LoraSegments, SlicedWeights
from kernels.quant import quantize_int4, quantize_int8
from kernels.triton import attention, quant, sgmv

DEFAULT_ARCH = 80
POINTER = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.int64: "*i64",
           torch.int32: "*i32", torch.uint8: "*u8", torch.int8: "*i8"}


class Recorder:
    """Stands in for a kernel: `kernel[grid](*args, **constexprs)` records the argument types."""

    def __init__(self, kernel, seen: dict) -> None:
        self.kernel, self.seen = kernel, seen

    def __getitem__(self, grid):
        def launch(*args, **constexprs):
            sig = {}
            for name, a in zip(self.kernel.arg_names, args):
                if isinstance(a, torch.Tensor):
                    sig[name] = POINTER[a.dtype]
                elif isinstance(a, float):
                    sig[name] = "fp32"
                else:
                    sig[name] = "i32" if -(2**31) <= a < 2**31 else "i64"
            sig.update(dict.fromkeys(constexprs, "constexpr"))
            key = (self.kernel.__name__, tuple(sig.items()), tuple((k, str(v)) for k, v in constexprs.items()))
            self.seen.setdefault(key, (self.kernel, sig, constexprs))
        return launch


def record() -> dict:
    seen: dict = {}
    for module, name in ((sgmv, "_shrink_kernel"), (sgmv, "_expand_kernel"),
                         (attention, "_paged_attention_kernel"), (quant, "_dequant_mm_kernel")):
        setattr(module, name, Recorder(getattr(module, name), seen))
        module.check_launchable = lambda *a: None  # CPU tensors: nothing is launched

    # a spread of what the model launches, not every combination (each configuration compiles in ~1 s)
    g = torch.Generator().manual_seed(0)
    for x_dtype, w_dtype, tokens, d_in in ((torch.bfloat16, torch.bfloat16, 3, 1024),  # decode: split K
                                           (torch.bfloat16, torch.bfloat16, 70, 576),  # prefill
                                           (torch.bfloat16, torch.float32, 70, 576),  # fp32 slots, bf16 model
                                           (torch.float16, torch.float16, 3, 576),
                                           (torch.float32, torch.float32, 3, 1024)):
        seg = LoraSegments.from_token_slots([0] * (tokens - 2) + [-1, 1])
        fused = [SlicedWeights(torch.randn(d_in, 24, dtype=w_dtype), torch.randn(24, 192, dtype=w_dtype),
                               [8, 8, 8], [128, 32, 32]),
                 SlicedWeights(torch.randn(d_in, 80, dtype=w_dtype), torch.randn(80, 192, dtype=w_dtype),
                               [16, 0, 64], [128, 32, 32])]
        sgmv.sgmv_(torch.zeros(tokens, 192, dtype=x_dtype), torch.randn(tokens, d_in, dtype=x_dtype), seg, fused)
    for dtype, d_in in ((torch.bfloat16, 1024), (torch.bfloat16, 576), (torch.float16, 576)):  # graph replays
        flat = torch.zeros(sum(sgmv.SlotTables.sizes(2, 3)), dtype=torch.int64)
        tables = sgmv.SlotTables.views(flat, 2, (128, 32, 32), 3 * 64, sgmv.MIN_DOT, sgmv.MIN_DOT,
                                       sgmv.float_dtype(torch.empty(0, dtype=dtype), "weights"))
        sgmv.sgmv_static_(torch.zeros(8, 192, dtype=dtype), torch.randn(8, d_in, dtype=dtype),
                          torch.zeros(sgmv.static_tile_capacity(8, 2), 3, dtype=torch.int64), tables)
    plan = AttentionPlan.build([[0, 1, 2], [3, 4]], [37, 0], [1, 6], 16)  # a decode and an extend
    for dtype, heads, kv_heads, d in ((torch.bfloat16, 9, 3, 64), (torch.bfloat16, 8, 8, 128),
                                      (torch.bfloat16, 32, 4, 128), (torch.float16, 9, 3, 64),
                                      (torch.float32, 9, 3, 64)):
        kc = torch.zeros(8, 16, kv_heads, d, dtype=dtype)
        attention.paged_attention(torch.randn(7, heads, d, dtype=dtype), kc, kc.clone(), plan, d**-0.5)
    w4, w4g16 = quantize_int4(torch.randn(128, 256, generator=g), 32), quantize_int4(torch.randn(128, 256), 16)
    w8, w8pc = quantize_int8(torch.randn(128, 256), 32), quantize_int8(torch.randn(128, 256))
    for dtype, w, m in ((torch.bfloat16, w4, 1), (torch.bfloat16, w4, 40), (torch.bfloat16, w4g16, 1),
                        (torch.bfloat16, w8, 1), (torch.bfloat16, w8pc, 40), (torch.float16, w4, 1),
                        (torch.float32, w8, 1)):
        quant.quant_linear(torch.randn(m, 256, dtype=dtype), w, torch.zeros(128, dtype=dtype))
    return seen


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    arch = int(args[args.index("--arch") + 1]) if "--arch" in args else DEFAULT_ARCH
    target = GPUTarget("cuda", arch, 32)
    seen = record()
    failed = []
    for kernel, sig, constexprs in seen.values():
        what = f"{kernel.__name__} {constexprs} {[t for t in sig.values() if t != 'constexpr']}"
        try:
            triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=constexprs), target=target)
        except Exception:  # report every failing configuration, not only the first
            failed.append(what)
            print(f"FAILED {what}\n{traceback.format_exc()}", file=sys.stderr)
    print(f"compiled {len(seen) - len(failed)} of {len(seen)} launch configurations for {target.backend} "
          f"sm_{target.arch}")
    return 1 if failed or not seen else 0


if __name__ == "__main__":
    sys.exit(main())
