"""`make gpu-check`: everything a CUDA machine should prove, in one short run, with nothing but this checkout.

1. The device and its ceilings: a large device-to-device copy (GB/s) and a large bf16 matmul (TFLOP/s).
2. Every Triton launch configuration compiles for the device's own architecture (tests/kernels/gpu_compile).
3. The CUDA-only tests (tests/runtime/test_cuda.py), with the real compiler.
4. The kernel benchmark on llama-8B shapes (bench/kernels.py).
5. The engine on a synthetic Llama-3-8B (random int4 weights built on the GPU): one request alone (decode
   tokens/s), 64 concurrent requests without adapters, and 64 over 32 adapters (ranks 8/16/32/64 on all seven
   projections); tokens/s, TTFT and TPOT percentiles from each request's own timings. Decode steps replay
   CUDA graphs, as `loraserve serve` does (`--no-cuda-graphs`: eager, for an A/B).

Writes bench/results/gpu_check.json (and $OUT/gpu_check.json when OUT is set). `--dry-run` runs the same
steps on the CPU at toy sizes (synthetic SmolLM2, the torch backend, no compile or CUDA tests), to check the
script itself where no GPU is at hand. The GPU machine lacks structlog and gguf: carry their wheels (README).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import MappingProxyType

import torch

ROOT = Path(__file__).resolve().parents[1]
RANKS = (8, 16, 32, 64)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def log(msg: str) -> None:
    print(f"[gpu-check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def ceilings(device: torch.device) -> dict:
    if device.type != "cuda":
        return {}
    x = torch.empty(2**30, dtype=torch.uint8, device=device)  # 1 GiB
    y = torch.empty_like(x)
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    for _ in range(3):
        y.copy_(x)
        a @ a
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    copy_gbs = 2 * x.numel() * 10 / (time.perf_counter() - t) / 1e9  # bytes read and written
    t = time.perf_counter()
    for _ in range(10):
        a @ a
    torch.cuda.synchronize()
    tflops = 2 * 8192**3 * 10 / (time.perf_counter() - t) / 1e12
    del x, y, a
    torch.cuda.empty_cache()
    return {"copy_gbs": copy_gbs, "bf16_matmul_tflops": tflops}


def run(cmd: list[str], env: dict | None = None, timeout: int = 300) -> dict:
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                       timeout=timeout)
    out = (r.stdout + r.stderr)[-3000:]
    log(f"{' '.join(cmd[2:])}: exit {r.returncode} in {time.perf_counter() - t:.0f} s")
    return {"exit": r.returncode, "seconds": time.perf_counter() - t, "tail": out}


def random_adapter(arch, rank: int, seed: int):
    """A ParsedAdapter of `rank` on all seven projections of every layer (small random weights)."""
    from adapters.peft_config import LoraAdapterConfig, ModuleLora
    from adapters.peft_format import LoraWeights, ParsedAdapter

    g = torch.Generator().manual_seed(seed)
    shapes = arch.linear_shapes()
    modules, weights = {}, {}
    for layer in range(arch.num_layers):
        for proj in PROJECTIONS:
            out_f, in_f = shapes[proj]
            modules[(layer, proj)] = ModuleLora(rank, 2.0 * rank, 2.0)
            weights[(layer, proj)] = LoraWeights(torch.randn(rank, in_f, generator=g) * in_f**-0.5,
                                                 torch.randn(out_f, rank, generator=g) * 0.01, 2.0)
    return ParsedAdapter(LoraAdapterConfig(MappingProxyType(modules), use_rslora=False), MappingProxyType(weights))


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def engine_bench(model: str, device: str, requests: int, adapters: int, prompt_len: int, new_tokens: int,
                 cuda_graphs: bool = True) -> dict:
    from adapters.identity import adapter_version_id
    from service.builder import build_runtime
    from service.config import AdapterConfig, EngineConfig, RuntimeConfig
    from service.engine.sampling import SamplingParams

    t = time.perf_counter()
    rt = build_runtime(RuntimeConfig(model=model, device=device, max_model_len=2048, cuda_graphs=cuda_graphs),
                       EngineConfig(max_num_seqs=requests, max_num_batched_tokens=4096),
                       AdapterConfig(max_active_adapters=max(adapters, 1), host_cache_mib=65536,
                                     host_cache_max_count=max(adapters, 1) + 1, max_lora_rank=max(RANKS)))
    versions = []
    for i in range(adapters):
        parsed = random_adapter(rt.loaded.arch, RANKS[i % len(RANKS)], seed=i)
        vid = adapter_version_id(parsed, rt.loaded.model_id)
        rt.local_adapters[vid] = parsed
        versions.append(vid)
    build_s = time.perf_counter() - t
    log(f"runtime on {device} ({rt.model.kernels.name} kernels) and {adapters} adapters in {build_s:.0f} s")
    vocab = rt.loaded.arch.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, vocab, (prompt_len,), generator=g).tolist() for _ in range(requests)]
    sp = SamplingParams(max_tokens=new_tokens, min_tokens=new_tokens, temperature=0, ignore_eos=True)
    engine = rt.engine

    def timed(ps: list[list[int]], vs: list[str | None] | None) -> dict:
        engine.generate(ps[:2], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True),
                        vs[:2] if vs else None)  # warm: kernels compiled, adapters loaded and activated
        if vs:
            engine.generate(ps[:len(set(vs))], SamplingParams(max_tokens=1, temperature=0),
                            list(dict.fromkeys(vs)))  # every adapter loaded once before timing
        t0 = time.perf_counter()
        outs = engine.generate(ps, sp, vs)
        wall = time.perf_counter() - t0
        n = sum(o.usage.output_tokens for o in outs)
        ttft = [o.timings.ttft_s for o in outs if o.timings.ttft_s is not None]
        tpot = [o.timings.tpot_s for o in outs if o.timings.tpot_s is not None]
        return {"requests": len(ps), "output_tokens": n, "wall_s": wall, "tok_s": n / wall,
                "ttft_p50_s": percentile(ttft, 0.5), "ttft_p99_s": percentile(ttft, 0.99),
                "tpot_p50_s": percentile(tpot, 0.5), "tpot_p99_s": percentile(tpot, 0.99),
                "tpot_mean_s": statistics.fmean(tpot) if tpot else None}

    single = timed(prompts[:1], None)
    batched = timed(prompts, None)
    mixed = timed(prompts, [versions[i % adapters] for i in range(requests)]) if adapters else None
    graphs = rt.runner.graphs
    return {"model": model, "device": device, "kernels": rt.model.kernels.name, "build_s": build_s,
            "decode_graph_buckets": graphs.buckets if graphs is not None else None,
            "prompt_tokens": prompt_len, "new_tokens": new_tokens, "single_stream": single,
            "batched_no_adapter": batched, "mixed_adapters": mixed, "adapters": adapters,
            "ranks": list(RANKS), "kv_blocks": rt.runner.num_blocks}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="bench.gpu_check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="the same steps on the CPU at toy sizes")
    ap.add_argument("--skip", default="", help="comma-separated steps to skip: compile,tests,kernels,engine")
    ap.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                    help="time the engine with eager decode steps (default: CUDA graphs, as served)")
    args = ap.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    if not args.dry_run and not torch.cuda.is_available():
        log("no CUDA device here: run this on a GPU machine (or --dry-run to check the script on the CPU)")
        return {}
    device = torch.device("cpu") if args.dry_run else torch.device("cuda", 0)
    from service.runtime.device import describe

    res: dict = {"device": describe(device), "torch": torch.__version__, "started": time.strftime("%Y-%m-%d %H:%M")}
    try:
        import triton

        res["triton"] = triton.__version__
    except ImportError:
        res["triton"] = None
    res["ceilings"] = ceilings(device)
    log(f"device {res['device']}, ceilings {res['ceilings']}")
    if not args.dry_run:
        major, minor = torch.cuda.get_device_capability(device)
        if "compile" not in skip:
            res["compile"] = run([sys.executable, "-m", "tests.kernels.gpu_compile", "--arch", f"{major}{minor}"])
        if "tests" not in skip:
            res["cuda_tests"] = run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                                     "tests/runtime/test_cuda.py"], env={"LORASERVE_TEST_INTERPRET": "0"})
        if "kernels" not in skip:
            from bench import kernels

            res["kernels"] = kernels.main(["--shapes", "llama8b"])
    if "engine" not in skip:
        if args.dry_run:
            res["engine"] = engine_bench("synthetic:smollm2-135m", "cpu", requests=4, adapters=2, prompt_len=16,
                                         new_tokens=4)
        else:
            res["engine"] = engine_bench("synthetic:llama-3-8b", "cuda", requests=64, adapters=32, prompt_len=288,
                                         new_tokens=64, cuda_graphs=args.cuda_graphs)
        e = res["engine"]
        log(f"engine: single stream {e['single_stream']['tok_s']:.1f} tok/s, 64 requests "
            f"{e['batched_no_adapter']['tok_s']:.1f} tok/s"
            + (f", over {e['adapters']} adapters {e['mixed_adapters']['tok_s']:.1f} tok/s" if e["mixed_adapters"]
               else ""))
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    name = "gpu_check_dry_run.json" if args.dry_run else "gpu_check.json"
    text = json.dumps(res, indent=2, default=str)
    (out_dir / name).write_text(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], name).write_text(text)
    log(f"written to bench/results/{name}")
    return res


if __name__ == "__main__":
    main()
