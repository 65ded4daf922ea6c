"""Multi-LoRA benchmark: the *mixed* workload over 32 adapters, 1 adapter and none, against
transformers + peft on the same model, adapters and prompts, in the same run.

64 requests (shared ~256-token system prompt + unique ~32-token question, chat template), 64 output
tokens each (fixed), greedy, all submitted at once. 32 adapters of ranks 8/16/32/64 on all seven
projections, small random weights, written by peft itself. Baselines:
- hf_peft_batched: one left-padded static batch, `generate(..., adapter_names=[...])`;
- hf_peft_sequential: one request at a time, `set_adapter` before each `generate` (timed over the first
  `--sequential-requests` requests: its tokens/s does not depend on how many run).
Ours: 32 / 1 / 0 adapters each timed `--rounds` times (default 2), the order reversed every other round.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

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
)
from bench.engine import engine_run, hf_run, load_hf_default_model
from service.builder import build_runtime
from service.config import AdapterConfig, EngineConfig, RuntimeConfig
from service.runtime.loader import default_model_path

RANKS = (8, 16, 32, 64)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def write_adapters(hf, n: int, root: Path) -> list[Path]:
    """n peft adapters with small random weights (ranks RANKS in turn, on TARGETS) saved under root; their dirs."""
    import peft

    dirs = []
    for i in range(n):
        torch.manual_seed(i)
        cfg = peft.LoraConfig(r=RANKS[i % len(RANKS)], lora_alpha=16, target_modules=TARGETS, init_lora_weights=False)
        pm = peft.get_peft_model(copy.deepcopy(hf), cfg)
        with torch.no_grad():  # small deltas: the model still talks, the LoRA work is all there
            for name, p in pm.named_parameters():
                if "lora_B" in name:
                    p.mul_(0.01)
        d = root / f"a{i}"
        pm.save_pretrained(d)
        dirs.append(d)
    return dirs


def make_adapters(hf, n: int, root: Path):
    """n peft adapters with small random weights; returns (PeftModel holding all of them, dirs)."""
    import peft

    dirs = write_adapters(hf, n, root)
    ref = peft.PeftModel.from_pretrained(hf, dirs[0], adapter_name="a0").eval()
    for i in range(1, n):
        ref.load_adapter(dirs[i], adapter_name=f"a{i}")
    return ref, dirs


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="bench.multi_lora", description=__doc__)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--adapters", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--sequential-requests", type=int, default=4)
    ap.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--rounds", type=int, default=2, help="timed runs of each configuration, the order alternating")
    args = ap.parse_args(argv)
    n, na, new = args.requests, args.adapters, args.new_tokens

    hf = load_hf_default_model()
    with tempfile.TemporaryDirectory() as tmp:
        ref, dirs = make_adapters(hf, na, Path(tmp))
        rt = build_runtime(RuntimeConfig(threads=args.threads), EngineConfig(max_num_seqs=n, max_num_batched_tokens=2048),
                           AdapterConfig(max_active_adapters=na))
        versions = [rt.add_local_adapter(d) for d in dirs]
    prompts = chat_prompts(rt.tokenizer, n)
    # Every adapter loaded, fused and active before anything is timed (as the peer's are, from its start): the
    # figures are serving with them, not loading them.
    warm = [rt.tokenizer.encode(f"warm up {i} " * 20) for i in range(na)]
    engine_run(rt.engine, warm, 4, [versions[i] for i in range(na)])

    res = {"workload": "mixed", "requests": n, "adapters": na, "ranks": list(RANKS), "targets": TARGETS,
           "new_tokens": new, "model": default_model_path().name, "quantization": rt.loaded.quantization,
           "rounds": args.rounds, **environment()}
    # Each configuration timed once a round, the order reversed every other round (this machine's speed drifts
    # within minutes: a ratio of two runs timed apart would measure the drift too); tokens over seconds in all.
    configs = {"tok_s_32_adapters": [versions[i % na] for i in range(n)], "tok_s_1_adapter": [versions[1]] * n,
               "tok_s_no_adapter": [None] * n}
    spent = {key: [0.0, 0] for key in configs}
    prompt_computed = {key: 0 for key in configs}  # prompt tokens the engine computed (not read from the cache)
    for rnd in range(args.rounds):
        for key in list(configs)[:: 1 if rnd % 2 == 0 else -1]:
            rt.engine.pool.reset_prefix_cache()  # every configuration starts cold
            before = rt.engine.stats.prompt_tokens_computed
            dt, tokens = engine_run(rt.engine, prompts, new, configs[key])
            spent[key][0] += dt
            spent[key][1] += tokens
            prompt_computed[key] = rt.engine.stats.prompt_tokens_computed - before
    res.update({key: tokens / seconds for key, (seconds, tokens) in spent.items()})
    res["ratio_32_vs_1_adapter"] = res["tok_s_32_adapters"] / res["tok_s_1_adapter"]
    res["ratio_1_adapter_vs_none"] = res["tok_s_1_adapter"] / res["tok_s_no_adapter"]
    arch = rt.loaded.arch
    per_layer = sum(i + o for o, i in arch.linear_shapes().values())
    ranks = [RANKS[i % len(RANKS)] for i in range(na)]
    mean_rank = sum(ranks) / na
    res["flops_per_token"] = 2 * arch.active_params() + 2 * mean_rank * per_layer * arch.num_layers
    res["peak_fp32_gflops"] = peak32 = measure_peak_gflops(torch.float32)
    res["peak_bf16_gflops"] = peak16 = measure_peak_gflops(torch.bfloat16)
    mm = matmul_peak_dtype(torch.bfloat16)  # the base matmuls' dtype on this CPU (float32 without native bf16)
    res["roofline_dtype"] = str(mm).removeprefix("torch.")
    peak = peak16 if mm == torch.bfloat16 else peak32
    res["peak_bandwidth_gbs"] = bandwidth = measure_bandwidth_gbs()
    res["roofline_tok_s"] = peak * 1e9 / res["flops_per_token"]
    res["roofline_fraction"] = res["tok_s_32_adapters"] / res["roofline_tok_s"]
    # The workload's own limit: a decode step of all n requests reads the base weights once, the weights of
    # every adapter active in it (in the dtype the slots hold them) and every request's KV, and computes 2 FLOPs
    # per weight per token; tokens per step / max(FLOPs / peak, bytes / bandwidth).
    # KV positions one step must read at least: the prompts' common prefix once per adapter (requests of one
    # adapter share its blocks; other adapters' K/V differ), the rest once per request.
    shared = next((i for i, col in enumerate(zip(*prompts)) if len(set(col)) > 1), min(map(len, prompts)))
    ctx = sum(map(len, prompts)) / n + new / 2  # mean context over the decode steps
    positions = min(na, n) * shared + n * (ctx - shared)
    a_t = next(w[0] for groups in rt.runner.lora_slots.table for ws in groups.values() for w in ws if w is not None)
    res["lora_weight_dtype"] = str(a_t.dtype).removeprefix("torch.")
    step_bytes = (model_bytes_per_token(rt.model) + a_t.element_size() * sum(ranks) * per_layer * arch.num_layers
                  + kv_bytes(arch, round(positions)))
    step_flops = n * res["flops_per_token"]
    res["workload_step_bytes"], res["workload_step_flops"] = step_bytes, step_flops
    res["workload_roofline_tok_s"] = n / max(step_flops / (peak * 1e9), step_bytes / (bandwidth * 1e9))
    res["workload_roofline_fraction"] = res["tok_s_32_adapters"] / res["workload_roofline_tok_s"]
    # The decode-step roofline above leaves out the prompts. With 32 adapters each adapter's requests compute the
    # shared system prompt anew (different adapters never share K/V), so the run must also compute these prompt
    # tokens (2 FLOPs per layer weight, base and adapter, each; the LM head only for a prompt's last token, left
    # out, as is attention): the whole run's roofline is their FLOPs at the peak plus the decode steps at the bound
    # above; its ratio to `workload_roofline_tok_s` is the most `workload_roofline_fraction` can reach here.
    res["prompt_tokens_computed_32_adapters"] = prompt_computed["tok_s_32_adapters"]
    prompt_flops = res["flops_per_token"] - 2 * arch.vocab_size * arch.hidden_size
    prompt_s = prompt_computed["tok_s_32_adapters"] * prompt_flops / (peak * 1e9)
    decode_s = (new - 1) * max(step_flops / (peak * 1e9), step_bytes / (bandwidth * 1e9))
    res["run_roofline_tok_s"] = n * new / (prompt_s + decode_s)
    res["run_roofline_fraction"] = res["tok_s_32_adapters"] / res["run_roofline_tok_s"]
    res["workload_roofline_fraction_reachable"] = res["run_roofline_tok_s"] / res["workload_roofline_tok_s"]
    res.update(peer_results())
    if not args.skip_hf:
        names = [f"a{i % na}" for i in range(n)]
        hf_run(ref, [prompts[0][:16]], 2, pad_id=2, adapter_names=["a0"])  # warm-up
        dt, tokens = hf_run(ref, prompts, new, pad_id=2, adapter_names=names)
        res["hf_peft_batched_tok_s"] = tokens / dt
        seq_dt = seq_tokens = 0
        for i in range(min(args.sequential_requests, n)):
            ref.set_adapter(names[i])
            dt, tokens = hf_run(ref, [prompts[i]], new, pad_id=2)
            seq_dt, seq_tokens = seq_dt + dt, seq_tokens + tokens
        res["hf_peft_sequential_tok_s"] = seq_tokens / seq_dt
        res["ratio_vs_hf_peft_batched"] = res["tok_s_32_adapters"] / res["hf_peft_batched_tok_s"]
        res["ratio_vs_hf_peft_sequential"] = res["tok_s_32_adapters"] / res["hf_peft_sequential_tok_s"]
    report("multi_lora", "multi-LoRA", res)
    return res


if __name__ == "__main__":
    main()
