"""Where a decode step's time goes on the CPU: milliseconds per step for 1, 8 and 64 requests in decode.

The mixed workload's requests (chat prompts of ~290 tokens with a shared system prompt; one request alone uses
the single-stream prompt) are prefilled, then `--steps` decode-only steps are timed, each op of the kernel
backend wrapped by a timer (`linear` includes the LM head's matmul, which `logits` also contains; `forward` is
the layers). The same steps are timed with the C decode kernels off (`LORASERVE_NATIVE=0` semantics: the
torch ops), alternating, so the table is an A/B from one run. Results: bench/results/steps.json.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from contextlib import contextmanager

from bench.common import chat_prompts, environment, print_table, single_prompt, write_result
from kernels import native
from service.builder import build_runtime
from service.config import EngineConfig, RuntimeConfig
from service.engine.request import RequestSpec
from service.engine.sampling import SamplingParams

OPS = ("linear", "paged_attention", "rope_write_kv", "add_rms_norm", "silu_mul", "sgmv_", "embedding", "decode_layers")


class Timed:
    """The model's kernel backend with every op timed into `spent` (seconds by op name)."""

    def __init__(self, inner, spent: dict[str, float]) -> None:
        self._inner, self._spent = inner, spent
        self.name = inner.name

    def __getattr__(self, op: str):
        fn = getattr(self._inner, op)
        if op not in OPS:
            return fn

        return _timed(fn, op, self._spent)


def _timed(fn, name: str, spent: dict[str, float]):
    def timed(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[name] += time.perf_counter() - t

    return timed


@contextmanager
def native_kernels(on: bool):
    """The C decode kernels on or off for the block (the same switch as LORASERVE_NATIVE=0)."""
    saved = native._lib, native._loaded
    if not on:
        native._lib, native._loaded = None, True
    try:
        yield
    finally:
        native._lib, native._loaded = saved


def profile(rt, prompts: list[list[int]], steps: int, repeats: int) -> dict[str, dict[str, float]]:
    """Per-step milliseconds by part, C kernels on and off, alternating `repeats` times over fresh requests."""
    engine, model, runner = rt.engine, rt.model, rt.runner
    sp = SamplingParams(max_tokens=10_000, min_tokens=10_000, temperature=0, ignore_eos=True)
    out: dict[str, dict[str, float]] = {}
    for rep in range(repeats):
        for on in (True, False):
            ids = [f"p{rep}-{on}-{i}" for i in range(len(prompts))]
            for rid, p in zip(ids, prompts):
                engine.add_request(RequestSpec(rid, tuple(p), sp))
            while any(engine.get_request(r).num_computed_tokens < len(p) for r, p in zip(ids, prompts)):
                engine.step()  # prefill (and the first decodes) untimed
            spent: dict[str, float] = defaultdict(float)
            kernels, forward, logits, execute = model.kernels, model.forward, model.compute_logits, runner.execute
            model.kernels = Timed(kernels, spent)
            model.forward, model.compute_logits = _timed(forward, "forward", spent), _timed(logits, "logits", spent)
            runner.execute = _timed(execute, "execute", spent)
            try:
                with native_kernels(on):
                    engine.step()  # untimed: layouts a path builds on first use (e.g. the int8 split of the head)
                    spent.clear()
                    t = time.perf_counter()
                    for _ in range(steps):
                        engine.step()
                    spent["step"] += time.perf_counter() - t
            finally:
                model.kernels, model.forward, model.compute_logits, runner.execute = kernels, forward, logits, execute
                for rid in ids:
                    engine.abort_request(rid)
                engine.step()
            key = "c_kernels" if on else "torch_ops"
            acc = out.setdefault(key, defaultdict(float))
            for k, v in spent.items():
                acc[k] += v * 1e3 / steps / repeats
    for acc in out.values():
        # what execute spends outside the forward pass and the logits: metadata, sampling
        acc["sampling_and_metadata"] = acc.pop("execute") - acc["forward"] - acc["logits"]
        acc["scheduler_and_outputs"] = acc["step"] - acc["sampling_and_metadata"] - acc["forward"] - acc["logits"]
    return {k: dict(v) for k, v in out.items()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="bench.steps", description=__doc__)
    ap.add_argument("--batches", default="1,8,64", help="requests in decode, comma-separated")
    ap.add_argument("--steps", type=int, default=16, help="decode steps timed per batch and setting")
    ap.add_argument("--repeats", type=int, default=2, help="A/B alternations per batch")
    ap.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    args = ap.parse_args(argv)
    rt = build_runtime(RuntimeConfig(dtype="bfloat16", threads=args.threads),
                       EngineConfig(max_num_seqs=64, max_num_batched_tokens=2048))
    res: dict = {"c_kernels_available": native.library() is not None, **environment()}
    rows = []
    for n in (int(b) for b in args.batches.split(",")):
        prompts = [single_prompt(rt.tokenizer)] if n == 1 else chat_prompts(rt.tokenizer, n)
        parts = profile(rt, prompts, args.steps, args.repeats)
        res[f"batch_{n}"] = parts
        for key, p in parts.items():
            rows.append((f"{n} requests, {key}", "  ".join(f"{k} {v:.2f}" for k, v in sorted(p.items()))))
    write_result("steps", res)
    print_table("decode step, ms per step (bench/results/steps.json)", rows)
    return res


if __name__ == "__main__":
    main()
