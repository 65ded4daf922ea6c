"""Structured-output benchmark: the mixed workload's 64 requests with every request under a JSON schema against the
same requests unconstrained, in the same run; the per-token cost of the token mask; grammar compile times.

- Throughput: 64 requests (shared ~256-token system prompt + a unique question, chat template), greedy, all
  submitted at once, 64 output tokens each. Unconstrained requests ignore EOS to run the full 64; constrained ones
  answer a schema whose `answer` string must be at least 400 characters, so each is cut at exactly 64 tokens too
  and both runs decode the same number of tokens. The prefix cache is reset before each run.
- Tools in auto mode: the same requests under the format a chat with tools and `tool_choice` auto gets (free text,
  a call only in its tool's schema: `service.api.tools`), ignoring EOS as the unconstrained ones do; none of the
  answers calls the tool, so this is what offering tools costs an answer that does not use them
  (`auto_tools_vs_unconstrained_64`).
- Mask cost per constrained token: filling the rows' bitmasks (xgrammar, on the mask worker thread while the
  forward pass runs) plus applying them to the logits (`mask_us_per_token`), and the part of the fill the forward
  pass did not hide (`mask_wait_us_per_token`, time the sampler waited for it).
- Compile: distinct random JSON schemas (2-8 properties: bounded strings, patterns, integer and number ranges,
  enums, bounded arrays, nested objects), regexes and choice lists, each compiled once from a cold cache;
  `compile_ms_p50` / `compile_ms_p99` are the JSON schemas', the other kinds' have their own keys.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

from bench.common import chat_prompts, environment, report
from service.api.tools import Tool, ToolSet
from service.builder import build_runtime
from service.config import EngineConfig, RuntimeConfig
from service.engine.sampling import SamplingParams
from service.engine.structured import FormatKind, ResponseFormat
from service.runtime.loader import default_model_path
from service.runtime.structured import GrammarMasks, StructuredOutput

ANSWER_SCHEMA = {
    "type": "object",
    "properties": {
        "product_line": {"enum": ["ThermoLine", "FlowMax", "PressaCore", "EdgeBox", "SensorCloud", "unknown"]},
        "answer": {"type": "string", "minLength": 400, "maxLength": 2000},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
    },
    "required": ["product_line", "answer", "confidence"],
}
LOOKUP_TOOL = Tool("lookup_order", "Look up a customer's order by its number", {
    "type": "object", "properties": {"order_number": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{6}$"},
                                     "include_history": {"type": "boolean"}}, "required": ["order_number"]})


class MaskTimer:
    """Wraps a runner's GrammarMasks: seconds spent filling (worker thread), waiting for a fill the forward pass did
    not hide, and applying (sampler thread)."""

    def __init__(self, masks: GrammarMasks) -> None:
        self.fill_s = self.apply_s = self.wait_s = 0.0
        self.rows = 0
        fill, apply = masks._fill, masks.apply

        def timed_fill(rows):
            t = time.perf_counter()
            idx = fill(rows)
            self.fill_s += time.perf_counter() - t
            self.rows += len(idx)
            return idx

        def timed_apply(logits, filled):
            t0 = time.perf_counter()
            filled.result()
            t1 = time.perf_counter()
            apply(logits, filled)
            self.wait_s += t1 - t0
            self.apply_s += time.perf_counter() - t1

        masks._fill, masks.apply = timed_fill, timed_apply


def run(engine, prompts, params, grammars=None) -> tuple[float, int]:
    engine.pool.reset_prefix_cache()
    t = time.perf_counter()
    outs = engine.generate(prompts, params, grammars=grammars)
    dt = time.perf_counter() - t
    assert all(o.error is None for o in outs), [o.error for o in outs if o.error]
    return dt, sum(o.usage.output_tokens for o in outs)


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    """A JSON schema of 2-8 properties mixing the features the tests cover (nested objects at most 2 deep)."""
    props = {}
    for i in range(rng.randint(2, 8)):
        kind = rng.choice(["string", "pattern", "integer", "number", "enum", "array", "bool"]
                          + (["object"] if depth < 2 else []))
        name = f"f{i}_{kind}"
        if kind == "string":
            props[name] = {"type": "string", "minLength": rng.randint(0, 3), "maxLength": rng.randint(4, 40)}
        elif kind == "pattern":
            props[name] = {"type": "string", "pattern": f"^[A-Z]{{{rng.randint(1, 4)}}}-[0-9]{{{rng.randint(1, 6)}}}$"}
        elif kind == "integer":
            lo = rng.randint(-1000, 1000)
            props[name] = {"type": "integer", "minimum": lo, "maximum": lo + rng.randint(1, 100000)}
        elif kind == "number":
            props[name] = {"type": "number", "minimum": 0, "maximum": rng.randint(1, 1000)}
        elif kind == "enum":
            props[name] = {"enum": [f"v{j}_{rng.randint(0, 999)}" for j in range(rng.randint(2, 12))]}
        elif kind == "array":
            props[name] = {"type": "array", "items": {"type": "integer"}, "minItems": rng.randint(0, 2),
                           "maxItems": rng.randint(3, 10)}
        elif kind == "bool":
            props[name] = {"type": "boolean"}
        else:
            props[name] = random_schema(rng, depth + 1)
    required = sorted(rng.sample(sorted(props), rng.randint(1, len(props))))
    return {"type": "object", "properties": props, "required": required}


def compile_times(structured: StructuredOutput, n_schemas: int, seed: int = 0) -> dict[str, list[float]]:
    rng = random.Random(seed)
    formats = {
        "json_schema": [ResponseFormat(FormatKind.JSON_SCHEMA, json.dumps(random_schema(rng))) for _ in range(n_schemas)],
        "regex": [ResponseFormat(FormatKind.REGEX, rf"[A-Z]{{{i % 5 + 1}}}[0-9]{{2,{i % 7 + 3}}}(-[a-z]+)?")
                  for i in range(n_schemas // 4)],
        "choice": [ResponseFormat.choice([f"option {i}-{j}" for j in range(2 + i % 30)]) for i in range(n_schemas // 4)],
    }
    times: dict[str, list[float]] = {}
    for kind, fmts in formats.items():
        for fmt in fmts:
            t = time.perf_counter()
            structured.compile(fmt)
            times.setdefault(kind, []).append((time.perf_counter() - t) * 1000)
    return times


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="bench.structured", description=__doc__)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--schemas", type=int, default=200, help="distinct JSON schemas compiled for compile times")
    ap.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    args = ap.parse_args(argv)
    n, new = args.requests, args.new_tokens

    rt = build_runtime(RuntimeConfig(threads=args.threads), EngineConfig(max_num_seqs=n, max_num_batched_tokens=2048))
    prompts = chat_prompts(rt.tokenizer, n)
    grammar = rt.structured.compile(ResponseFormat(FormatKind.JSON_SCHEMA, json.dumps(ANSWER_SCHEMA)))
    free = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
    bound = SamplingParams(max_tokens=new, temperature=0)
    warm = [rt.tokenizer.encode(f"warm up {i} " * 20) for i in range(4)]
    run(rt.engine, warm, [SamplingParams(max_tokens=4, temperature=0)] * 4, [grammar] * 4)  # both paths warm
    run(rt.engine, warm, [SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)] * 4)
    timer = MaskTimer(rt.runner._grammar_masks())

    tools = rt.structured.compile(ToolSet((LOOKUP_TOOL,), "auto").format())
    run(rt.engine, warm, [SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)] * 4, [tools] * 4)

    # Alternate the runs so drift on a shared machine lands on each.
    free_runs, bound_runs, tool_runs = [], [], []
    for _ in range(2):
        free_runs.append(run(rt.engine, prompts, [free] * n))
        before = (timer.fill_s, timer.apply_s, timer.wait_s, timer.rows)
        tool_runs.append(run(rt.engine, prompts, [free] * n, [tools] * n))
        # the mask figures are the JSON schema's: the tool runs' part is taken back out
        timer.fill_s, timer.apply_s, timer.wait_s, timer.rows = before
        bound_runs.append(run(rt.engine, prompts, [bound] * n, [grammar] * n))
    f_dt, f_n = min(free_runs)
    b_dt, b_n = min(bound_runs)
    t_dt, t_n = min(tool_runs)
    assert f_n == b_n == t_n == n * new, (f"each run must decode {n * new} tokens: {f_n} free, {b_n} constrained, "
                                          f"{t_n} with tools")
    constrained_tokens = sum(t for _, t in bound_runs)

    cold = StructuredOutput(rt.tokenizer, rt.loaded.arch.vocab_size, cache_entries=10 * args.schemas)
    times = compile_times(cold, args.schemas)
    cold.close()
    all_ms = [t for ts in times.values() for t in ts]
    res = {
        "workload": "mixed-no-adapter", "requests": n, "new_tokens": new, "schema": ANSWER_SCHEMA,
        "model": default_model_path().name, "quantization": rt.loaded.quantization, "library": "xgrammar",
        **environment(),
        "unconstrained_tok_s": f_n / f_dt, "constrained_tok_s": b_n / b_dt,
        "constrained_vs_unconstrained_64": (b_n / b_dt) / (f_n / f_dt),
        "auto_tools_tok_s": t_n / t_dt, "auto_tools_vs_unconstrained_64": (t_n / t_dt) / (f_n / f_dt),
        "mask_us_per_token": (timer.fill_s + timer.apply_s) / constrained_tokens * 1e6,
        "mask_fill_us_per_token": timer.fill_s / constrained_tokens * 1e6,
        "mask_apply_us_per_token": timer.apply_s / constrained_tokens * 1e6,
        "mask_wait_us_per_token": timer.wait_s / constrained_tokens * 1e6,
        # The headline compile figures are the JSON schemas' (the common and the costly kind); every kind's follow.
        "compile_ms_p50": statistics.median(times["json_schema"]),
        "compile_ms_p99": percentile(times["json_schema"], 0.99),
        "compile_ms_p50_all_kinds": statistics.median(all_ms), "compile_ms_p99_all_kinds": percentile(all_ms, 0.99),
        "compiles": len(all_ms),
        **{f"compile_ms_p50_{k}": statistics.median(v) for k, v in times.items()},
        **{f"compile_ms_p99_{k}": percentile(v, 0.99) for k, v in times.items()},
    }
    report("structured", "structured output", res)
    return res


if __name__ == "__main__":
    main()
