"""Engine benchmark: the *mixed* workload shape without adapters, against transformers in the same run.

64 requests (a shared ~256-token system prompt + a unique ~32-token question, chat template), 64 output
tokens each (fixed: EOS ignored), greedy, all submitted at once. Baseline: transformers `generate` on
the same GGUF (dequantized to fp32 by transformers) with one left-padded static batch of the same
prompts. Also single-stream decode of one request on both, and the machine's measured roofline.
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.common import (
    chat_prompts,
    environment,
    kv_bytes,
    matmul_peak_dtype,
    measure_bandwidth_gbs,
    measure_peak_gflops,
    model_bytes_per_token,
    peer_results,
    report,
    single_prompt,
)
from service.builder import build_runtime
from service.config import EngineConfig, RuntimeConfig
from service.engine.sampling import SamplingParams
from service.runtime.loader import default_model_path


def engine_run(engine, prompts: list[list[int]], new_tokens: int,
               versions: list[str | None] | None = None) -> tuple[float, int]:
    sp = SamplingParams(max_tokens=new_tokens, min_tokens=new_tokens, temperature=0, ignore_eos=True)
    t = time.perf_counter()
    outs = engine.generate(prompts, sp, versions)
    assert all(o.error is None for o in outs), [o.error for o in outs if o.error]
    dt = time.perf_counter() - t
    n = sum(o.usage.output_tokens for o in outs)
    assert n == new_tokens * len(prompts), "fixed output length not honoured"
    return dt, n


def hf_run(hf, prompts: list[list[int]], new_tokens: int, pad_id: int, **generate_kwargs) -> tuple[float, int]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding, as batched generation needs
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    t = time.perf_counter()
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          do_sample=False, pad_token_id=pad_id, **generate_kwargs)
    dt = time.perf_counter() - t
    return dt, (out.shape[1] - width) * len(prompts)


def load_hf_default_model():
    import transformers

    path = default_model_path()
    return transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                             dtype=torch.float32).eval()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="bench.engine", description=__doc__)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    ap.add_argument("--skip-hf", action="store_true", help="only measure loraserve")
    ap.add_argument("--rounds", type=int, default=3,
                    help="timed runs of each of ours, every one from a cold prefix cache (tokens over seconds of all)")
    args = ap.parse_args(argv)

    rt = build_runtime(RuntimeConfig(dtype=args.dtype, threads=args.threads),
                       EngineConfig(max_num_seqs=args.requests, max_num_batched_tokens=2048))
    prompts = chat_prompts(rt.tokenizer, args.requests)
    single = single_prompt(rt.tokenizer)
    # Warm-up on unrelated text: model, allocator and first-batch costs stay out of the numbers.
    engine_run(rt.engine, [rt.tokenizer.encode(f"warm up {i} " * 20) for i in range(4)], 4)

    # Each timed run of the 64 requests starts from a cold prefix cache (the prompts' system prompt is computed
    # anew, then shared within the run), and the single request follows it (its system prompt then cached, as a
    # service's next request finds it); the figures are all the rounds' tokens over all their seconds (one ~3 s
    # run moves by ~10% with the machine's speed), each round's reported too.
    rounds: dict[str, list[tuple[float, int]]] = {"engine": [], "single_stream": []}
    hits = []  # prefix-cache hits of each engine round
    for _ in range(max(1, args.rounds)):
        rt.engine.pool.reset_prefix_cache()
        before = rt.engine.stats.prefix_cache_hit_tokens
        rounds["engine"].append(engine_run(rt.engine, prompts, args.new_tokens))
        hits.append(rt.engine.stats.prefix_cache_hit_tokens - before)
        rounds["single_stream"].append(engine_run(rt.engine, [single], args.new_tokens))
    e_dt, e_n = map(sum, zip(*rounds["engine"]))
    s_dt, s_n = map(sum, zip(*rounds["single_stream"]))
    arch = rt.loaded.arch
    peak32 = measure_peak_gflops(torch.float32)
    peak16 = measure_peak_gflops(torch.bfloat16)
    bandwidth = measure_bandwidth_gbs()
    flops_tok = 2 * arch.active_params()
    # The roofline of the dtype the engine's matmuls run in: bf16's where the CPU has it natively, float32's
    # where a bf16 model multiplies in float32 (kernels.cpu_features).
    mm = matmul_peak_dtype(torch.bfloat16 if args.dtype == "bfloat16" else torch.float32)
    roofline = (peak16 if mm == torch.bfloat16 else peak32) * 1e9 / flops_tok
    # One request alone reads every weight and its KV per token: bytes, not FLOPs, bound it.
    single_bytes = model_bytes_per_token(rt.model) + kv_bytes(arch, len(single) + args.new_tokens // 2)
    res = {
        "workload": "mixed-no-adapter", "requests": args.requests, "new_tokens": args.new_tokens,
        "prompt_tokens_mean": sum(map(len, prompts)) / len(prompts), "model": str(default_model_path().name),
        "quantization": rt.loaded.quantization, "dtype": args.dtype, **environment(),
        "engine_tok_s": e_n / e_dt, "engine_seconds": e_dt, "single_stream_tok_s": s_n / s_dt, "rounds": len(hits),
        **{f"{key}_rounds_tok_s": [n / dt for dt, n in runs] for key, runs in rounds.items()},
        "prefix_cache_hit_tokens": hits[0],  # one round's (every round's are the same prompts from cold)
        "peak_fp32_gflops": peak32, "peak_bf16_gflops": peak16, "flops_per_token": flops_tok,
        "roofline_tok_s": roofline, "roofline_fraction": e_n / e_dt / roofline,
        "roofline_dtype": str(mm).removeprefix("torch."),
        "peak_bandwidth_gbs": bandwidth, "single_stream_bytes_per_token": single_bytes,
        "single_stream_byte_roofline_tok_s": bandwidth * 1e9 / single_bytes,
        **peer_results(),
    }
    res["single_stream_byte_roofline_fraction"] = res["single_stream_tok_s"] / res["single_stream_byte_roofline_tok_s"]
    if not args.skip_hf:
        hf = load_hf_default_model()
        hf_run(hf, [prompts[0][:16]], 2, pad_id=2)  # warm-up
        h_dt, h_n = hf_run(hf, prompts, args.new_tokens, pad_id=2)
        hs_dt, hs_n = hf_run(hf, [single], args.new_tokens, pad_id=2)
        res.update(hf_batched_tok_s=h_n / h_dt, hf_single_stream_tok_s=hs_n / hs_dt,
                   ratio_vs_hf_batched=res["engine_tok_s"] / (h_n / h_dt),
                   single_stream_ratio_vs_hf=res["single_stream_tok_s"] / (hs_n / hs_dt))
    report("engine", "engine", res)
    return res


if __name__ == "__main__":
    main()
