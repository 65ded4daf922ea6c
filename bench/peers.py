"""The peer benchmark: our engine against llama.cpp's `llama-server` on the same GGUF file, the same prompts,
the same adapters and the same two threads, timed in the same run (`make bench ARGS=peers`).

Workloads (BENCH.md "mixed": a shared ~256-token system prompt plus a unique question through the chat
template, 64 output tokens, EOS ignored, greedy):
- single stream: one short chat request at a time, the same as bench/engine.py's (`--parallel 1` for the peer);
- batched: 64 requests at once, no adapter (`--parallel 64`: the peer reuses no prefix across slots);
- 32 / 1 / 0 adapters: the 64 requests over 32 adapters of ranks 8/16/32/64 on all seven projections, over one
  of them, and over none (the peer loads every adapter, `--lora-init-without-apply`, and each request names
  its own with a scale of 1).
Ours runs in this process; the peer is built once (bench/llamacpp.py, cached under bench/.peers/) and runs as
its own process, over HTTP from this one. Tokens/s count output tokens over wall time, prefill included, on
both sides. Writes bench/results/peers.json.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.common import chat_prompts, environment, report, single_prompt


def peer_tok_s(server, prompts: list[list[int]], new_tokens: int, loras: list[list[dict] | None]) -> float:
    t = time.perf_counter()
    with ThreadPoolExecutor(len(prompts)) as pool:
        outs = list(pool.map(lambda a: server.complete(a[0], new_tokens, a[1]), zip(prompts, loras)))
    wall = time.perf_counter() - t
    n = sum(o["tokens_predicted"] for o in outs)
    assert n == new_tokens * len(prompts), f"the peer generated {n} tokens, not {new_tokens} per request"
    return n / wall


def run_peer(model: Path, prompts: list[list[int]], single: list[int], new_tokens: int, threads: int,
             gguf_loras: list[Path], sequential: int) -> dict:
    from bench.llamacpp import LlamaServer

    res = {}
    one = LlamaServer(model, threads=threads, parallel=1)
    try:
        one.complete(prompts[0][:8], 2)  # warm
        t = time.perf_counter()
        for _ in range(sequential):
            one.complete(single, new_tokens)
        res["llamacpp_single_stream_tok_s"] = sequential * new_tokens / (time.perf_counter() - t)
    finally:
        one.stop()
    na = len(gguf_loras)
    many = LlamaServer(model, threads=threads, parallel=len(prompts), loras=gguf_loras)
    try:
        none = [[{"id": j, "scale": 0.0} for j in range(na)]] * len(prompts) if na else [None] * len(prompts)
        many.complete(prompts[0][:8], 2, none[0])  # warm
        res["llamacpp_batched_tok_s"] = peer_tok_s(many, prompts, new_tokens, none)
        if na:
            def only(k: int) -> list[dict]:
                return [{"id": j, "scale": 1.0 if j == k else 0.0} for j in range(na)]
            res["llamacpp_no_adapter_tok_s"] = res["llamacpp_batched_tok_s"]
            res["llamacpp_1_adapter_tok_s"] = peer_tok_s(many, prompts, new_tokens, [only(1)] * len(prompts))
            res["llamacpp_32_adapters_tok_s"] = peer_tok_s(many, prompts, new_tokens,
                                                           [only(i % na) for i in range(len(prompts))])
    finally:
        many.stop()
    return res


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="bench.peers", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--adapters", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--sequential", type=int, default=4, help="requests timed one at a time")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    from bench.engine import engine_run, load_hf_default_model
    from bench.gguf_lora import write_gguf_lora
    from bench.llamacpp import ensure_server
    from bench.multi_lora import RANKS, TARGETS, make_adapters
    from service.builder import build_runtime
    from service.config import AdapterConfig, EngineConfig, RuntimeConfig
    from service.runtime.loader import default_model_path

    ensure_server()  # before anything is timed: a first run builds it
    model = default_model_path()
    n, na, new = args.requests, args.adapters, args.new_tokens
    res = {"workload": "mixed", "requests": n, "adapters": na, "ranks": list(RANKS), "targets": TARGETS,
           "new_tokens": new, "model": model.name, "threads": args.threads, **environment()}
    rt = build_runtime(RuntimeConfig(threads=args.threads), EngineConfig(max_num_seqs=n, max_num_batched_tokens=2048),
                       AdapterConfig(max_active_adapters=max(na, 1)))
    prompts = chat_prompts(rt.tokenizer, n)
    single = single_prompt(rt.tokenizer)

    def ours(ps: list[list[int]], assign: list[str | None] | None) -> float:
        rt.engine.pool.reset_prefix_cache()
        dt, tokens = engine_run(rt.engine, ps, new, assign)
        return tokens / dt

    # Without adapters first, before this process builds the peft models (a process that held them runs
    # ours measurably slower afterwards: its allocator's state, not the engine's work).
    engine_run(rt.engine, [p[:16] for p in prompts[:4]], 2)
    alone = [ours([single], None) for _ in range(args.sequential)]
    res["single_stream_tok_s"] = len(alone) / sum(1 / s for s in alone)  # tokens over total time
    res["engine_tok_s"] = ours(prompts, None)
    with tempfile.TemporaryDirectory() as tmp:
        ggufs = []
        if na:
            _, dirs = make_adapters(load_hf_default_model(), na, Path(tmp))
            versions = [rt.add_local_adapter(d) for d in dirs]
            ggufs = [write_gguf_lora(d, rt.loaded.arch, Path(tmp) / f"a{i}.gguf") for i, d in enumerate(dirs)]
            # every adapter loaded and active before the timed runs, as the peer's are from its start
            engine_run(rt.engine, [prompts[i % n][:16] for i in range(na)], 2, versions)
            res["tok_s_32_adapters"] = ours(prompts, [versions[i % na] for i in range(n)])
            res["tok_s_1_adapter"] = ours(prompts, [versions[1]] * n)
            res["tok_s_no_adapter"] = res["engine_tok_s"]
        res.update(run_peer(model, prompts, single, new, args.threads, ggufs, args.sequential))
    res["ratio_single_stream"] = res["single_stream_tok_s"] / res["llamacpp_single_stream_tok_s"]
    res["ratio_batched"] = res["engine_tok_s"] / res["llamacpp_batched_tok_s"]
    if na:
        res["ratio_32_adapters"] = res["tok_s_32_adapters"] / res["llamacpp_32_adapters_tok_s"]
    report("peers", "loraserve vs llama.cpp's server", res)
    return res


if __name__ == "__main__":
    main()
