"""The peer benchmark: our engine against llama.cpp's `llama-server` on the same GGUF file, the same prompts,
the same adapters and the same two threads, timed in the same run (`make bench ARGS=peers`).

Workloads (BENCH.md "mixed": a shared ~256-token system prompt plus a unique question through the chat
template, 64 output tokens, EOS ignored, greedy):
- single stream: one short chat request at a time, the same as bench/engine.py's (`--parallel 1` for the peer);
- batched: 64 requests at once, no adapter (`--parallel 64`: the peer reuses no prefix across slots);
- 32 / 1 / 0 adapters: the 64 requests over 32 adapters of ranks 8/16/32/64 on all seven projections, over one
  of them, and over none (the peer loads every adapter, `--lora-init-without-apply`, and each request names
  its own with a scale of 1);
- a long prompt: the time to the first token of one fresh --long-prompt-tokens prompt (a document, no prefix
  cached on either side; ours in one step of the bench's 2,048-token budget), alone (`--parallel 1`).
Ours runs in this process; the peer is built once (bench/llamacpp.py, cached under bench/.peers/) and runs as
its own process, over HTTP from this one. Tokens/s count output tokens over wall time, prefill included, on
both sides. Each of our runs is paired with the peer's run of the same workload right before or after it, the
order alternating from one pair to the next (this machine's speed drifts over minutes: a ratio of two runs far
apart in time measures the drift too); both servers start before anything is timed and take no CPU while idle.
Writes bench/results/peers.json.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.common import chat_prompts, environment, long_prompt, report, single_prompt


def _write_adapters(n: int, root: str) -> None:
    """The child process's work: the bench's n peft adapters under root (bench.multi_lora.write_adapters)."""
    from bench.engine import load_hf_default_model
    from bench.multi_lora import write_adapters

    write_adapters(load_hf_default_model(), n, Path(root))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="bench.peers", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--adapters", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--sequential", type=int, default=4, help="requests timed one at a time, on each side")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--long-prompt-tokens", type=int, default=2000, help="the long prompt's tokens (0: not timed)")
    ap.add_argument("--long-prompt-runs", type=int, default=2, help="its timed runs on each side, in adjacent pairs")
    args = ap.parse_args(argv)

    from bench.engine import engine_run
    from bench.gguf_lora import write_gguf_lora
    from bench.llamacpp import LlamaServer, ensure_server
    from bench.multi_lora import RANKS, TARGETS
    from service.builder import build_runtime
    from service.config import AdapterConfig, EngineConfig, RuntimeConfig
    from service.runtime.loader import default_model_path

    ensure_server()  # before anything is timed: a first run builds it
    model = default_model_path()
    n, na, new = args.requests, args.adapters, args.new_tokens
    res = {"workload": "mixed", "requests": n, "adapters": na, "ranks": list(RANKS), "targets": TARGETS,
           "new_tokens": new, "model": model.name, "threads": args.threads,
           "timing": "adjacent pairs, the order alternating between workloads", **environment()}
    rt = build_runtime(RuntimeConfig(threads=args.threads), EngineConfig(max_num_seqs=n, max_num_batched_tokens=2048),
                       AdapterConfig(max_active_adapters=max(na, 1)))
    prompts = chat_prompts(rt.tokenizer, n)
    single = single_prompt(rt.tokenizer)
    long = long_prompt(rt.tokenizer, args.long_prompt_tokens) if args.long_prompt_tokens > 0 else []
    engine_run(rt.engine, [p[:16] for p in prompts[:4]], 2)

    def ours(ps: list[list[int]], assign: list[str | None] | None) -> tuple[float, int]:
        rt.engine.pool.reset_prefix_cache()
        return engine_run(rt.engine, ps, new, assign)

    with tempfile.TemporaryDirectory() as tmp:
        versions: list[str] = []
        ggufs: list[Path] = []
        if na:
            # In a child process: one that built the peft models runs ours measurably slower afterwards (its
            # allocator's state, not the engine's work).
            child = multiprocessing.get_context("spawn").Process(target=_write_adapters, args=(na, tmp))
            child.start()
            child.join()
            if child.exitcode != 0:
                raise RuntimeError(f"writing the adapters failed (exit code {child.exitcode})")
            dirs = [Path(tmp) / f"a{i}" for i in range(na)]
            versions = [rt.add_local_adapter(d) for d in dirs]
            ggufs = [write_gguf_lora(d, rt.loaded.arch, Path(tmp) / f"a{i}.gguf") for i, d in enumerate(dirs)]
            # every adapter loaded and active before the timed runs, as the peer's are from its start
            engine_run(rt.engine, [prompts[i % n][:16] for i in range(na)], 2, versions)
        # Both servers start before anything is timed; idle, they take no CPU while ours runs.
        one = LlamaServer(model, threads=args.threads, parallel=1, ctx_per_slot=max(2048, 2 * len(long)))
        many = LlamaServer(model, threads=args.threads, parallel=n, loras=ggufs)
        try:
            def scales(k: int | None) -> list[dict] | None:  # the peer's per-request adapter scales (k: the one on)
                return [{"id": j, "scale": 1.0 if j == k else 0.0} for j in range(na)] if na else None

            one.complete(prompts[0][:8], 2)  # warm
            many.complete(prompts[0][:8], 2, scales(None))

            def peer(ps: list[list[int]], loras: list[list[dict] | None]) -> tuple[float, int]:
                server = one if len(ps) == 1 else many
                t = time.perf_counter()
                with ThreadPoolExecutor(len(ps)) as pool:
                    outs = list(pool.map(lambda a: server.complete(a[0], new, a[1]), zip(ps, loras)))
                dt = time.perf_counter() - t
                got = sum(o["tokens_predicted"] for o in outs)
                assert got == new * len(ps), f"the peer generated {got} tokens, not {new} per request"
                return dt, got

            # (our key, the peer's key, our run, the peer's run); a pair's two runs are adjacent in time
            pairs = [("single_stream_tok_s", "llamacpp_single_stream_tok_s", lambda: ours([single], None),
                      lambda: peer([single], [None]))] * args.sequential
            pairs.append(("engine_tok_s", "llamacpp_batched_tok_s", lambda: ours(prompts, None),
                          lambda: peer(prompts, [scales(None)] * n)))
            if na:
                pairs.append(("tok_s_32_adapters", "llamacpp_32_adapters_tok_s",
                              lambda: ours(prompts, [versions[i % na] for i in range(n)]),
                              lambda: peer(prompts, [scales(i % na) for i in range(n)])))
                pairs.append(("tok_s_1_adapter", "llamacpp_1_adapter_tok_s", lambda: ours(prompts, [versions[1]] * n),
                              lambda: peer(prompts, [scales(1)] * n)))
            spent: dict[str, list[float]] = {}  # key -> [seconds, tokens], summed over its pairs
            for i, (key, peer_key, run_ours, run_peer) in enumerate(pairs):
                for k, run in ((key, run_ours), (peer_key, run_peer))[:: 1 if i % 2 == 0 else -1]:
                    dt, got = run()
                    acc = spent.setdefault(k, [0.0, 0])
                    acc[0] += dt
                    acc[1] += got
            res.update({k: tokens / seconds for k, (seconds, tokens) in spent.items()})
            if long:
                # Time to first token: the prompt computed from nothing (our prefix cache reset, the peer's
                # `cache_prompt` off) and one token sampled; ours in-process, the peer's over HTTP.
                def ours_long() -> float:
                    rt.engine.pool.reset_prefix_cache()
                    return engine_run(rt.engine, [long], 1)[0]

                def peer_long() -> float:
                    t = time.perf_counter()
                    out = one.complete(long, 1)
                    assert out["tokens_evaluated"] >= len(long), out.get("tokens_evaluated")  # nothing cached
                    return time.perf_counter() - t

                ttft: dict[str, list[float]] = {"long_prompt_ttft_s": [], "llamacpp_long_prompt_ttft_s": []}
                for i in range(max(1, args.long_prompt_runs)):
                    for k, run in (("long_prompt_ttft_s", ours_long),
                                   ("llamacpp_long_prompt_ttft_s", peer_long))[:: 1 if i % 2 == 0 else -1]:
                        ttft[k].append(run())
                res["long_prompt_tokens"] = len(long)
                for k, v in ttft.items():
                    res[k] = statistics.median(v)
                    res[f"{k}_runs"] = v
                res["ratio_long_prompt_ttft"] = res["llamacpp_long_prompt_ttft_s"] / res["long_prompt_ttft_s"]
        finally:
            one.stop()
            many.stop()
    if na:
        res["tok_s_no_adapter"] = res["engine_tok_s"]
        res["llamacpp_no_adapter_tok_s"] = res["llamacpp_batched_tok_s"]
        res["ratio_32_adapters"] = res["tok_s_32_adapters"] / res["llamacpp_32_adapters_tok_s"]
    res["ratio_single_stream"] = res["single_stream_tok_s"] / res["llamacpp_single_stream_tok_s"]
    res["ratio_batched"] = res["engine_tok_s"] / res["llamacpp_batched_tok_s"]
    report("peers", "loraserve vs llama.cpp's server", res)
    return res


if __name__ == "__main__":
    main()
