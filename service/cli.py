"""`loraserve` command line: generate (offline or through a server), serve over gRPC, manage adapters,
read usage, make tenants' keys, benchmark."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from service.cli_client import add_client_args, add_commands, add_format_args, format_kwargs
from service.config import (
    DTYPES,
    QUANTIZE_MODES,
    SCHEDULING_POLICIES,
    AdapterConfig,
    EngineConfig,
    RuntimeConfig,
    ServerConfig,
    ServiceConfig,
)
from service.engine.request import RequestSpec
from service.engine.sampling import SamplingParams
from service.engine.speculative import MAX_DRAFT_TOKENS, SPECULATION_MODES
from service.engine.structured import FormatKind, ResponseFormat

# The database URL from the environment (a Kubernetes Secret): it carries a password, which a flag would show in
# the process list.
DATABASE_URL_ENV = "LORASERVE_DATABASE_URL"


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", metavar="PATH", help="a .gguf file or an HF model directory (config.json + "
                   "*.safetensors), or synthetic:smollm2-135m / synthetic:llama-3-8b (random weights of that "
                   "shape, for timing); default: the embedded SmolLM2-135M-Instruct Q4_1")
    g.add_argument("--quantize", choices=QUANTIZE_MODES, help="quantize an fp16/bf16/fp32 HF checkpoint on load")
    g.add_argument("--draft-model", metavar="PATH", help="a smaller model with the same tokenizer (.gguf, HF "
                   "directory or synthetic:NAME) that proposes speculative drafts for --speculation draft")
    g.add_argument("--dtype", choices=DTYPES,
                   help="compute dtype: bfloat16 is the fast CPU path, float32 the exact one (default: bfloat16)")
    g.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    g.add_argument("--kv-cache-gib", type=float,
                   help="paged KV arena size in GiB (default: 1 on the CPU; on a GPU what --gpu-memory-fraction leaves)")
    g.add_argument("--device", help="cpu, cuda, cuda:N or auto (the first GPU if there is one) (default: cpu)")
    g.add_argument("--dense-weights-mib", type=int,
                   help="CPU: also hold the weights dense for batched steps (bfloat16; float32 on a CPU without "
                        "native bf16) when that takes at most this many MiB; 0 never "
                        f"(default: {RuntimeConfig.dense_weights_mib})")
    g.add_argument("--gpu-memory-fraction", type=float,
                   help=f"on a GPU, the share of its memory to use (default: {RuntimeConfig.gpu_memory_fraction})")
    g.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction,
                   help="on a GPU, capture decode steps as CUDA graphs per batch-size bucket and replay them "
                        "(default: on)")
    g.add_argument("--max-model-len", type=int, help="context length limit (default: the model's)")
    g.add_argument("--log-level", help="stderr log level: debug, info, warning, error (default: warning; serve: "
                   "info)")


def runtime_flags(args: argparse.Namespace) -> dict:
    """The model flags as RuntimeConfig fields (None: not given)."""
    return dict(model=args.model, quantize=args.quantize, dtype=args.dtype, threads=args.threads,
                kv_cache_gib=args.kv_cache_gib, max_model_len=args.max_model_len, device=args.device,
                gpu_memory_fraction=args.gpu_memory_fraction, dense_weights_mib=args.dense_weights_mib,
                cuda_graphs=args.cuda_graphs, draft_model=args.draft_model)


def runtime_config(args: argparse.Namespace) -> RuntimeConfig:
    return RuntimeConfig(**{k: v for k, v in runtime_flags(args).items() if v is not None})


def add_call_sampling_args(c: argparse.ArgumentParser) -> None:
    """Generation options of `call`: unset ones take the server's defaults."""
    c.add_argument("--raw", action="store_true", help="complete the prompt as plain text, no chat template")
    c.add_argument("--system", help="a system message for the chat template")
    c.add_argument("--max-tokens", type=int)
    c.add_argument("--temperature", type=float, help="0 = greedy (default: the server's, 1)")
    c.add_argument("--top-p", type=float)
    c.add_argument("--top-k", type=int)
    c.add_argument("--seed", type=int)
    c.add_argument("--stop", action="append", metavar="TEXT", help="stop sequence (repeatable)")
    add_speculation_args(c, "the server's default")


def add_speculation_args(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--speculation", choices=SPECULATION_MODES,
                   help=f"speculative decoding: off, ngram (prompt lookup) or draft (the server's draft model, "
                        f"--draft-model); the output is the same either way (default: {default})")
    p.add_argument("--max-draft-tokens", type=int, metavar="K",
                   help=f"most draft tokens verified per step, 1 to {MAX_DRAFT_TOKENS} (default: {default})")


def cmd_generate(args: argparse.Namespace) -> int:
    if args.target:  # through a running server: --adapter names an adapter there
        from service.cli_client import cmd_call

        args.stream = True
        return cmd_call(args)
    from service.builder import build_runtime

    sampling = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                              top_k=args.top_k, seed=args.seed, stop=tuple(args.stop or ()),
                              speculation=args.speculation, max_draft_tokens=args.max_draft_tokens)
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
    fmt = response_format(**format_kwargs(args))
    if fmt is not None and rt.structured is None:
        raise ValueError("response formats need xgrammar, which is not installed here")
    grammar = rt.structured.compile(fmt) if fmt is not None else None
    engine.add_request(RequestSpec("cli", tuple(ids), sampling, adapter_version=version, grammar=grammar))
    n = 0
    reason = None
    while engine.has_unfinished():
        for out in engine.step():
            sys.stdout.write(out.new_text)
            sys.stdout.flush()
            n += len(out.new_token_ids)
            if out.final is not None:
                reason = out.final.finish_reason
                if out.final.error is not None:
                    print(f"error: {out.final.error.message}", file=sys.stderr)
                    return 1
    sys.stdout.write("\n")
    dt = time.perf_counter() - t0
    if args.verbose:
        print(f"[{n} tokens in {dt:.2f}s, {n / dt:.1f} tok/s, finish: {reason.value if reason else '?'}"
              f"{', adapter ' + version if version else ''}]", file=sys.stderr)
    return 0


def response_format(json_schema: str | None = None, json_object: bool = False, regex: str | None = None,
                    choice: list[str] | None = None, grammar: str | None = None) -> ResponseFormat | None:
    """The engine's ResponseFormat for `format_kwargs` (offline generate)."""
    if json_schema is not None:
        return ResponseFormat(FormatKind.JSON_SCHEMA, json_schema)
    if json_object:
        return ResponseFormat(FormatKind.JSON_OBJECT)
    if regex is not None:
        return ResponseFormat(FormatKind.REGEX, regex)
    if choice:
        return ResponseFormat.choice(choice)
    if grammar is not None:
        return ResponseFormat(FormatKind.GRAMMAR, grammar)
    return None


def serve_configs(args: argparse.Namespace) -> tuple:
    """(RuntimeConfig, EngineConfig, AdapterConfig, ServerConfig, ServiceConfig) from the config file,
    overridden by the flags given on the command line. Everything is checked before the model loads."""
    from service.config import read_config_file

    values = read_config_file(args.config) if args.config else {}
    flags = {
        RuntimeConfig: runtime_flags(args),
        EngineConfig: dict(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_batched_tokens,
                           max_waiting=args.max_waiting, scheduling_policy=args.scheduling_policy,
                           input_token_weight=args.input_token_weight,
                           output_token_weight=args.output_token_weight,
                           max_shared_prefill_tokens=args.max_shared_prefill_tokens, speculation=args.speculation,
                           max_draft_tokens=args.max_draft_tokens),
        AdapterConfig: dict(max_active_adapters=args.max_active_adapters),
        ServerConfig: dict(host=args.host, port=args.port, http_port=args.http_port, drain_grace_s=args.drain_grace_s,
                           grpc_workers=args.grpc_workers, client_stall_timeout_s=args.client_stall_timeout_s,
                           max_message_mib=args.max_message_mib, max_prompt_bytes=args.max_prompt_bytes,
                           stream_interval=args.stream_interval),
        ServiceConfig: dict(data_dir=args.data_dir, tenants_file=args.tenants, metrics_port=args.metrics_port,
                            max_upload_mib=args.max_upload_mib,
                            tls_cert=args.tls_cert, tls_key=args.tls_key, tls_client_ca=args.tls_client_ca,
                            otlp_endpoint=args.otlp_endpoint, log_format="json" if args.log_json else None,
                            database_url=args.database_url or os.environ.get(DATABASE_URL_ENV) or None),
    }
    out = []
    for cls, given in flags.items():
        merged = dict(values.get(cls, {}))
        merged.update({k: v for k, v in given.items() if v is not None})
        try:
            out.append(cls(**merged))
        except TypeError as e:  # a value of the wrong type in the config file
            raise ValueError(f"invalid configuration for {cls.__name__}: {e}") from None
    rc, ec = out[0], out[1]
    if ec.speculation == "draft" and not rc.draft_model:
        raise ValueError("speculation 'draft' as the server's default needs a draft model: give --draft-model "
                         "(runtime.draft_model), or use --speculation ngram or off")
    return tuple(out)


def cmd_serve(args: argparse.Namespace) -> int:
    from service.api.adapter_refs import parse_adapter_option

    # Every option is checked before the (slow) model load.
    adapters = [parse_adapter_option(a) for a in args.adapter or ()]
    rc, ec, ac, sc, svc = serve_configs(args)
    from service.telemetry import configure_logging

    configure_logging(args.log_level or svc.log_level, json=svc.log_format == "json")
    from service.server import serve  # imports torch

    return serve(rc, ec, ac, sc, svc, adapters)


def cmd_bench(args: argparse.Namespace) -> int:
    # bench/ lives in the source tree beside service/, not in the installed package: from an editable install (what
    # `make install` makes) the checkout is where this file is
    root = Path(__file__).resolve().parents[1]
    if (root / "bench" / "run.py").is_file() and str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        from bench.run import main as bench_main
    except ImportError as e:
        print(f"error: the benchmarks need a source checkout of loraserve ({e}); run them from it with `make bench`",
              file=sys.stderr)
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
    g.add_argument("--adapter", metavar="DIR|NAME", help="apply a PEFT LoRA adapter directory "
                   "(adapter_config.json + adapter_model.safetensors); with --target, an adapter on the server "
                   "(name, name@version, owner/name)")
    g.add_argument("--max-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default: %(default)s)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int)
    g.add_argument("--stop", action="append", metavar="TEXT", help="stop sequence (repeatable)")
    g.add_argument("-v", "--verbose", action="store_true", help="print token count and speed to stderr")
    add_speculation_args(g, f"{EngineConfig.speculation}, {EngineConfig.max_draft_tokens} drafts")
    add_format_args(g)
    add_model_args(g)
    add_client_args(g, offline_default=True)
    g.set_defaults(func=cmd_generate)

    s = sub.add_parser("serve", help="serve the model over gRPC (InferenceService, health, reflection)",
                       description="Serve over gRPC until SIGTERM/SIGINT, then drain and exit 0.")
    s.add_argument("--config", metavar="FILE", help="YAML config file (sections runtime, engine, adapters, server, "
                   "service, store, telemetry, tls, pricing); flags given here override it")
    s.add_argument("--host", help="address to listen on (default: 127.0.0.1)")
    s.add_argument("--port", type=int, help="port; 0 = any free port (default: 50051)")
    s.add_argument("--http-port", type=int, help="also serve the OpenAI-compatible HTTP API (/v1/chat/completions, "
                   "/v1/completions, /v1/models, /health, /metrics) on this port of --host; 0 = any free port "
                   "(default: off)")
    s.add_argument("--adapter", action="append", metavar="NAME=DIR",
                   help="register a PEFT LoRA adapter directory under NAME, usable by every tenant (repeatable)")
    s.add_argument("--tenants", metavar="FILE", help="tenants file: API key hashes, admin role, limits "
                   "(default: open access, one admin tenant 'default')")
    s.add_argument("--data-dir", metavar="DIR", help="adapter registry, usage ledger and adapter store "
                   "(default: ./data)")
    s.add_argument("--database-url", metavar="URL", help="the registry and usage ledger: sqlite:///DIR (this "
                   "process's own files; default: the data directory) or postgresql://user:password@host:port/db, "
                   f"shared by replicas (default: ${DATABASE_URL_ENV}, else the config file's database.url)")
    s.add_argument("--metrics-port", type=int, help="serve Prometheus metrics over HTTP on this port "
                   "(default: off; 0 = any free port)")
    s.add_argument("--tls-cert", metavar="PEM", help="server certificate chain (enables TLS)")
    s.add_argument("--tls-key", metavar="PEM", help="server private key")
    s.add_argument("--tls-client-ca", metavar="PEM", help="require client certificates signed by this CA (mTLS)")
    s.add_argument("--otlp-endpoint", metavar="URL", help="export request spans over OTLP/gRPC to this collector")
    s.add_argument("--max-num-seqs", type=int, help=f"requests running at once (default: {EngineConfig.max_num_seqs})")
    s.add_argument("--max-batched-tokens", type=int,
                   help=f"token budget of one engine step (default: {EngineConfig.max_num_batched_tokens})")
    s.add_argument("--max-waiting", type=int, help="waiting-queue bound; past it requests get RESOURCE_EXHAUSTED "
                   f"(default: {EngineConfig.max_waiting})")
    s.add_argument("--scheduling-policy", choices=SCHEDULING_POLICIES,
                   help="between tenants: vtc = fair share of weighted tokens (each tenant's `weight` in the "
                        "tenants file), fcfs = priority then arrival (default: vtc)")
    s.add_argument("--input-token-weight", type=float, metavar="W",
                   help=f"fair-share cost of one prompt token computed (default: {EngineConfig.input_token_weight:g})")
    s.add_argument("--output-token-weight", type=float, metavar="W",
                   help=f"fair-share cost of one generated token (default: {EngineConfig.output_token_weight:g})")
    s.add_argument("--max-shared-prefill-tokens", type=int, metavar="N",
                   help="vtc: while more than one tenant has requests in, the most prompt tokens one step computes, "
                        "so a tenant's new request waits for a short step only (default: "
                        f"{EngineConfig.max_shared_prefill_tokens})")
    s.add_argument("--speculation", choices=SPECULATION_MODES,
                   help="speculative decoding of requests that do not choose: off, ngram (prompt lookup) or draft "
                        "(needs --draft-model); outputs are the same either way (default: "
                        f"{EngineConfig.speculation})")
    s.add_argument("--max-draft-tokens", type=int, metavar="K",
                   help=f"most draft tokens a request verifies per step (default: {EngineConfig.max_draft_tokens})")
    s.add_argument("--max-active-adapters", type=int,
                   help=f"distinct adapters in one batch (default: {AdapterConfig.max_active_adapters})")
    s.add_argument("--drain-grace-s", type=float,
                   help=f"on SIGTERM, how long running requests may finish (default: {ServerConfig.drain_grace_s})")
    s.add_argument("--grpc-workers", type=int, help="RPC threads (default: max-num-seqs + max-waiting, capped)")
    s.add_argument("--client-stall-timeout-s", type=float,
                   help="cancel a call that waits this long on its client, e.g. a stream nobody reads "
                        f"(default: {ServerConfig.client_stall_timeout_s})")
    s.add_argument("--max-message-mib", type=int, help="largest gRPC message the server receives; larger ones get "
                   f"RESOURCE_EXHAUSTED (default: {ServerConfig.max_message_mib})")
    s.add_argument("--max-prompt-bytes", type=int, help="largest prompt text (or chat messages' content in total) "
                   "in UTF-8 bytes, checked before tokenizing (default: 16 per token of the context window)")
    s.add_argument("--stream-interval", type=int, metavar="N",
                   help="tokens a streamed message gathers before it is sent; the first token and the last message "
                        "go at once (default: 1, every step's tokens as they come; more: fewer messages and "
                        "wake-ups under many streams)")
    s.add_argument("--max-upload-mib", type=int, help="largest adapter upload of a tenant whose limits say "
                   f"max_upload_bytes: null, and in open access (default: {ServiceConfig.max_upload_mib})")
    s.add_argument("--log-json", action="store_true", help="JSON log lines on stderr")
    add_model_args(s)
    s.set_defaults(func=cmd_serve, log_level=None)  # the flag, else the config file's, else info

    add_commands(sub, add_call_sampling_args)

    # no help of its own: `loraserve bench --help` is bench/run.py's, which lists the workloads
    b = sub.add_parser("bench", help="run the benchmarks of bench/ (the same as `make bench ARGS=...`; see "
                       "Performance in the README)", add_help=False)
    b.add_argument("bench_args", nargs=argparse.REMAINDER)
    b.set_defaults(func=cmd_bench, log_level="warning")
    return p


def main(argv: list[str] | None = None) -> int:
    from service.telemetry import configure_logging

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # everything after it is bench/run.py's, --help included
        configure_logging("warning")
        return cmd_bench(argparse.Namespace(bench_args=argv[1:]))
    args = build_parser().parse_args(argv)
    configure_logging(getattr(args, "log_level", None) or "warning", json=getattr(args, "log_json", False))
    try:
        return args.func(args)
    except (ValueError, OSError) as e:  # incl. a missing model path and a port already taken
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
