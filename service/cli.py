"""`loraserve` command line: generate offline, serve over gRPC, benchmark."""

from __future__ import annotations

import argparse
import sys
import time

from service.config import DTYPES, QUANTIZE_MODES, EngineConfig, RuntimeConfig
from service.engine.sampling import SamplingParams


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", metavar="PATH", help="a .gguf file or an HF model directory (config.json + "
                   "*.safetensors); default: the embedded SmolLM2-135M-Instruct Q4_1")
    g.add_argument("--quantize", choices=QUANTIZE_MODES, help="quantize an fp16/bf16/fp32 HF checkpoint on load")
    g.add_argument("--dtype", choices=DTYPES, default="bfloat16",
                   help="compute dtype: bfloat16 is the fast CPU path, float32 the exact one (default: %(default)s)")
    g.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    g.add_argument("--kv-cache-gib", type=float, default=1.0, help="paged KV arena size (default: %(default)s)")
    g.add_argument("--max-model-len", type=int, help="context length limit (default: the model's)")
    g.add_argument("--log-level", default="warning", help="stderr log level (default: %(default)s)")


def runtime_config(args: argparse.Namespace) -> RuntimeConfig:
    return RuntimeConfig(model=args.model, quantize=args.quantize, dtype=args.dtype, threads=args.threads,
                         kv_cache_gib=args.kv_cache_gib, max_model_len=args.max_model_len)


def cmd_generate(args: argparse.Namespace) -> int:
    from service.runtime.builder import build_runtime

    sampling = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                              top_k=args.top_k, seed=args.seed, stop=tuple(args.stop or ()))
    rt = build_runtime(runtime_config(args), EngineConfig())
    tok = rt.tokenizer
    if args.raw:
        ids = tok.encode(args.prompt)
    else:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        messages.append({"role": "user", "content": args.prompt})
        ids = tok.encode_chat(messages)
    engine = rt.engine
    t0 = time.perf_counter()
    version = rt.add_local_adapter(args.adapter) if args.adapter else None
    engine.add_request("cli", ids, sampling, extra_key=version)
    n = 0
    reason = None
    while engine.has_unfinished():
        for out in engine.step():
            sys.stdout.write(out.new_text)
            sys.stdout.flush()
            n += len(out.new_token_ids)
            if out.finished:
                reason = out.finish_reason
                if out.error:
                    print(f"error: {out.error}", file=sys.stderr)
                    return 1
    sys.stdout.write("\n")
    dt = time.perf_counter() - t0
    if args.verbose:
        print(f"[{n} tokens in {dt:.2f}s, {n / dt:.1f} tok/s, finish: {reason.value if reason else '?'}"
              f"{', adapter ' + version if version else ''}]", file=sys.stderr)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    try:
        from bench.run import main as bench_main
    except ImportError as e:  # bench/ lives in the source tree, not in the installed package
        print(f"error: the benchmarks need a source checkout of loraserve ({e})", file=sys.stderr)
        return 2
    return bench_main(args.bench_args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loraserve", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text offline, streaming to stdout",
                       description="Generate with the model; the answer streams to stdout, logs go to stderr.")
    g.add_argument("--prompt", required=True, help="the user message (or plain text with --raw)")
    g.add_argument("--raw", action="store_true", help="complete the prompt as plain text, no chat template")
    g.add_argument("--system", help="a system message for the chat template")
    g.add_argument("--adapter", metavar="DIR", help="apply a PEFT LoRA adapter directory "
                   "(adapter_config.json + adapter_model.safetensors)")
    g.add_argument("--max-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default: %(default)s)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int)
    g.add_argument("--stop", action="append", metavar="TEXT", help="stop sequence (repeatable)")
    g.add_argument("-v", "--verbose", action="store_true", help="print token count and speed to stderr")
    add_model_args(g)
    g.set_defaults(func=cmd_generate)

    b = sub.add_parser("bench", help="run the benchmarks of bench/ (see BENCH in the README)")
    b.add_argument("bench_args", nargs=argparse.REMAINDER)
    b.set_defaults(func=cmd_bench, log_level="warning")
    return p


def main(argv: list[str] | None = None) -> int:
    from service.telemetry import configure_logging

    args = build_parser().parse_args(argv)
    configure_logging(getattr(args, "log_level", "warning"))
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, NotADirectoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
