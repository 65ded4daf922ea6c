"""Time every CPU path of `kernels.quant.quant_linear` on the default model's shapes.

    python -m bench.quant_linear [--m 1 64 128] [--paths auto dequant ...] [--threads 1]

Prints median and min ms, and GFLOP/s at the min, per (weight, M, path); used to set the thresholds in kernels/quant_cpu.py.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from kernels import quant_cpu
from kernels.quant import QuantizedTensor, quant_linear, quantize_int4, quantize_int8


def _time(fn: Callable[[], object], budget_s: float = 0.5) -> tuple[float, float]:
    """(median, min) seconds per call after two warm-up calls; min is the uncontended speed."""
    fn()
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < budget_s or len(times) < 5:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times)


def _paths(w: QuantizedTensor) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    paths: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "auto": lambda x: quant_linear(x, w),
        "dequant": lambda x: quant_cpu.dequant_mm(x, w),
    }
    if w.kind == "int4":
        paths["int4pack"] = lambda x: quant_cpu.int4pack_mm(x, w)
    elif w.group_size == w.shape[1]:
        paths["int8pack"] = lambda x: quant_cpu.int8pack_mm(x, w)
        paths["int8split"] = lambda x: quant_cpu.int8_split_mm(x, w)
    else:
        paths["int8split"] = lambda x: quant_cpu.int8_split_mm(x, w)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--m", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--paths", nargs="+", default=None, help="subset of paths to time (default: all)")
    parser.add_argument("--budget", type=float, default=0.5, help="seconds of timing per measurement")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    weights = {
        "int4 g32 [1536x576]": quantize_int4(torch.randn(1536, 576) * 0.05, 32),
        "int4 g32 [576x1536]": quantize_int4(torch.randn(576, 1536) * 0.05, 32),
        "int8 g32 [49152x576]": quantize_int8(torch.randn(49152, 576) * 0.05, 32),
        "int8 per-channel [49152x576]": quantize_int8(torch.randn(49152, 576) * 0.05, None),
    }
    for name, w in weights.items():
        n, k = w.shape
        for m in args.m:
            for dtype in (torch.bfloat16, torch.float32):
                x = torch.randn(m, k, dtype=dtype)
                paths = _paths(w) if dtype == torch.bfloat16 else {"auto": lambda x, w=w: quant_linear(x, w)}
                for path, fn in paths.items():
                    if args.paths and path not in args.paths:
                        continue
                    med, best = _time(lambda fn=fn, x=x: fn(x), args.budget)
                    gflops = 2 * m * n * k / best / 1e9
                    dt = str(dtype).removeprefix("torch.")
                    print(
                        f"{name:30s} M={m:4d} {dt:9s} {path:10s} median {med * 1e3:9.3f} ms  "
                        f"min {best * 1e3:9.3f} ms {gflops:7.1f} GFLOP/s",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
