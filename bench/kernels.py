"""Kernel benchmark (CUDA only): each Triton kernel against the torch path and the device's ceilings.

    make bench ARGS=kernels        python -m bench.run kernels [--shapes llama8b|smollm] [--smoke]

Per kernel and shape: median time of the Triton and the torch implementation on the same inputs, the
bandwidth achieved (the bytes the op must move at least, over its time) and FLOP/s, each also as a
fraction of the device's measured copy bandwidth and bf16 matmul rate. Each case first checks that both
implementations agree. Without CUDA it says so and exits 0; `--smoke` instead runs tiny shapes on the
CPU through the Triton interpreter (checks the cases run and agree; its times mean nothing).
"""

from __future__ import annotations

import argparse
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from bench.common import environment, print_table, write_result


@dataclass(frozen=True)
class Shapes:
    hidden: int
    inter: int
    heads: int
    kv_heads: int
    head_dim: int
    rank: int
    adapters: int
    decode_seqs: int  # decodes per step (one token each), each over `ctx` cached tokens
    ctx: int
    prefill_tokens: int  # tokens of a prefill-shaped step
    ms: tuple[int, ...]  # batch rows of the quantized matmuls


SHAPES = {
    "llama8b": Shapes(4096, 14336, 32, 8, 128, 16, 16, 64, 1024, 1024, (1, 16, 256)),
    "smollm": Shapes(576, 1536, 9, 3, 64, 16, 16, 64, 1024, 1024, (1, 16, 256)),
    "smoke": Shapes(64, 128, 4, 2, 16, 8, 3, 3, 20, 24, (1, 5)),
}


@dataclass
class Case:
    name: str
    triton: Callable[[], torch.Tensor]
    torch: Callable[[], torch.Tensor]
    bytes: int  # what the op must read and write at least
    flops: int


def _bytes(*ts: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def quant_cases(s: Shapes, device: str) -> list[Case]:
    from kernels.quant import quant_linear, quantize_int4, quantize_int8
    from kernels.triton import quant as tq

    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    cases = []
    for label, n, k in (("qkv", q + 2 * kv, s.hidden), ("down", s.hidden, s.inter)):
        dense = torch.randn(n, k, device=device) * 0.02
        for kind, w in (("int4-g32", quantize_int4(dense, 32)), ("int8-channel", quantize_int8(dense))):
            for m in s.ms:
                x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
                held = [w.qweight, w.scales] + ([w.zeros] if w.zeros is not None else [])
                cases.append(Case(f"linear {label} {kind} {n}x{k} M={m}", lambda x=x, w=w: tq.quant_linear(x, w),
                                  lambda x=x, w=w: quant_linear(x, w), _bytes(*held) + _bytes(x) + m * n * 2,
                                  2 * m * n * k))
    return cases


def sgmv_cases(s: Shapes, device: str) -> list[Case]:
    from kernels.lora import LoraSegments, SlicedWeights, sgmv_torch_
    from kernels.triton import sgmv as ts

    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    out, r = q + 2 * kv, s.rank
    weights = []
    for _ in range(s.adapters):  # the model's fused q/k/v layout: B^T block-diagonal, one block per slice
        b_t = torch.zeros(3 * r, out, device=device, dtype=torch.bfloat16)
        for i, (o0, o1) in enumerate(((0, q), (q, q + kv), (q + kv, out))):
            b_t[i * r : (i + 1) * r, o0:o1] = torch.randn(r, o1 - o0, device=device) * 0.02
        a_t = torch.randn(s.hidden, 3 * r, device=device, dtype=torch.bfloat16) * 0.02
        weights.append(SlicedWeights(a_t, b_t, [r, r, r], [q, kv, kv]))
    cases = []
    for label, tokens, adapters in (("decode", s.decode_seqs, s.adapters),
                                    ("prefill", s.prefill_tokens, min(4, s.adapters))):
        per = max(1, tokens // adapters)
        seg = LoraSegments.from_token_slots([min(i // per, adapters - 1) for i in range(tokens)])
        x = torch.randn(tokens, s.hidden, device=device, dtype=torch.bfloat16)
        y = torch.zeros(tokens, out, device=device, dtype=torch.bfloat16)
        used = {sl for sl in seg.slots if sl >= 0}
        # A^T and the diagonal blocks of B^T of each adapter used, x, y read and written
        weight_bytes = len(used) * (s.hidden * 3 * r + r * out) * 2
        cases.append(Case(f"sgmv qkv {label} T={tokens} adapters={len(used)} r={r}",
                          lambda x=x, y=y, seg=seg: ts.sgmv_(y.clone(), x, seg, weights),
                          lambda x=x, y=y, seg=seg: sgmv_torch_(y.clone(), x, seg, weights),
                          weight_bytes + _bytes(x) + 2 * _bytes(y), 2 * tokens * r * (3 * s.hidden + out)))
    return cases


def attention_cases(s: Shapes, device: str) -> list[Case]:
    from kernels.attention import AttentionPlan, paged_attention_torch
    from kernels.triton import attention as ta

    bs = 16
    scale = s.head_dim**-0.5
    cases = []
    n_ext = 4
    for label, seqs in (("decode", [(s.ctx, 1)] * s.decode_seqs),
                        ("extend", [(s.ctx // 2, s.prefill_tokens // n_ext)] * n_ext)):
        need = [-(-(c + n) // bs) for c, n in seqs]
        blocks = list(range(sum(need)))
        random.Random(0).shuffle(blocks)
        tables, i = [], 0
        for k in need:
            tables.append(blocks[i : i + k])
            i += k
        kc = torch.randn(len(blocks), bs, s.kv_heads, s.head_dim, device=device, dtype=torch.bfloat16)
        vc = torch.randn_like(kc)
        plan = AttentionPlan.build(tables, [c for c, _ in seqs], [n for _, n in seqs], bs, device=device)
        qt = torch.randn(sum(n for _, n in seqs), s.heads, s.head_dim, device=device, dtype=torch.bfloat16)
        keys = sum(n * c + n * (n + 1) // 2 for c, n in seqs)  # (query, key) pairs attended
        kv_bytes = sum(c + n for c, n in seqs) * s.kv_heads * s.head_dim * 2 * 2
        cases.append(Case(f"attention {label} seqs={len(seqs)} ctx={seqs[0][0]} new={seqs[0][1]}",
                          lambda q=qt, kc=kc, vc=vc, p=plan: ta.paged_attention(q, kc, vc, p, scale),
                          lambda q=qt, kc=kc, vc=vc, p=plan: paged_attention_torch(q, kc, vc, p, scale),
                          kv_bytes + 2 * _bytes(qt), 4 * keys * s.heads * s.head_dim))
    return cases


def _timer(device: str) -> Callable[[Callable[[], object]], float]:
    """Seconds per call: CUDA-event medians on a GPU; one wall-clock call in the smoke run."""
    if device == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") / 1e3

    def once(fn: Callable[[], object]) -> float:
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t
    return once


def ceilings(device: str) -> tuple[float, float]:
    """(copy bandwidth bytes/s, bf16 matmul FLOP/s) measured on the device."""
    timer = _timer(device)
    n = (256 << 20) // 4 if device == "cuda" else 1 << 16
    src = torch.empty(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    copy_bw = 2 * _bytes(src) / timer(lambda: dst.copy_(src))  # read + write
    m = 8192 if device == "cuda" else 128
    a = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    mm = 2 * m**3 / timer(lambda: a @ a)
    return copy_bw, mm


def _agree(case: Case) -> None:
    got, want = case.triton().float(), case.torch().float()
    err = (got - want).abs().max().item()
    if not err <= 2e-2 * max(want.abs().max().item(), 1e-6):
        raise RuntimeError(f"{case.name}: Triton and torch disagree by {err:.3g}")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="bench.kernels", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", choices=[k for k in SHAPES if k != "smoke"], default="llama8b")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes on the CPU through the Triton interpreter: the cases run and agree")
    args = ap.parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # read when kernels.triton is first imported, just below
        device, shapes = "cpu", SHAPES["smoke"]
    elif not torch.cuda.is_available():
        print("bench kernels: no CUDA device on this machine, nothing to time (the Triton kernels are "
              "checked on the CPU through the interpreter by tests/kernels; `--smoke` runs these cases so)")
        return {}
    else:
        device, shapes = "cuda", SHAPES[args.shapes]
    timer = _timer(device)
    copy_bw, mm = ceilings(device)
    rows, results = [], []
    for case in quant_cases(shapes, device) + sgmv_cases(shapes, device) + attention_cases(shapes, device):
        _agree(case)
        t_tr, t_th = timer(case.triton), timer(case.torch)
        bw, fl = case.bytes / t_tr, case.flops / t_tr
        results.append({"case": case.name, "triton_ms": t_tr * 1e3, "torch_ms": t_th * 1e3, "bytes": case.bytes,
                        "flops": case.flops, "triton_gbs": bw / 1e9, "triton_tflops": fl / 1e12,
                        "of_copy_bw": bw / copy_bw, "of_matmul": fl / mm})
        rows.append((case.name, f"triton {t_tr * 1e3:8.3f} ms  torch {t_th * 1e3:8.3f} ms "
                                f"(triton {t_th / t_tr:5.1f}x)  "
                                f"{bw / 1e9:7.1f} GB/s ({bw / copy_bw:4.0%} of copy)  "
                                f"{fl / 1e12:6.2f} TFLOP/s ({fl / mm:4.0%} of matmul)"))
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (interpreter smoke run)"
    print_table(f"kernels on {name}: copy {copy_bw / 1e9:.0f} GB/s, bf16 matmul {mm / 1e12:.1f} TFLOP/s", rows)
    data = {"device": name, "shapes": "smoke" if args.smoke else args.shapes, "copy_gbs": copy_bw / 1e9,
            "matmul_tflops": mm / 1e12, "cases": results, "environment": environment()}
    if not args.smoke:
        print(f"wrote {write_result('kernels', data)}")
    return data


if __name__ == "__main__":
    main()
