"""Shared pieces of the benchmarks: workload prompts, the machine's measured ceiling, result files."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"

SYSTEM_PROMPT = (
    "You are the support assistant of a company that sells industrial sensors, controllers and the cloud "
    "software that connects them. Answer the customer's question precisely and briefly. When the question "
    "is about a product, name the product line, the relevant specification and any limits that apply. When "
    "the question is about an order, explain which information the customer needs to provide and where to "
    "find it. Never invent part numbers, prices or delivery dates; if you do not know, say so and point to "
    "the documentation portal or the support hotline. Use metric units, keep a friendly and professional "
    "tone, avoid marketing language, and do not repeat the question. If the customer writes in another "
    "language, answer in that language. Summarise long procedures as numbered steps, and mention safety "
    "warnings first whenever electrical installation or calibration is involved. The current product lines "
    "are: ThermoLine temperature probes, FlowMax flow meters, PressaCore pressure transmitters, the EdgeBox "
    "controller family and the SensorCloud platform with its dashboards and alerting rules."
)

TOPICS = ["temperature probes", "flow meters", "pressure transmitters", "the EdgeBox controller",
          "SensorCloud alerts", "calibration", "firmware updates", "cable lengths", "warranty", "returns",
          "power supply", "data export", "API access", "wireless range", "IP ratings", "mounting"]


# The single-stream request of every benchmark (ours and the peer's): one short chat turn.
SINGLE_PROMPT = "Tell me a short story about a lighthouse."


def single_prompt(tokenizer) -> list[int]:
    return tokenizer.encode_chat([{"role": "user", "content": SINGLE_PROMPT}])


def long_prompt(tokenizer, n: int) -> list[int]:
    """A document of exactly n tokens (distinct numbered paragraphs over TOPICS) as one user message's text, for the
    time to first token of a long prompt; no chat template (the peer gets the same ids)."""
    # a paragraph is ~35 tokens: n // 8 of them are more than enough, encoded once
    ids = tokenizer.encode(" ".join(
        f"Paragraph {i + 1}. Site {1000 + 37 * i} reported {3 + i % 9} units of {TOPICS[i % len(TOPICS)]} installed in "
        f"week {i % 52 + 1}; the crew noted {i % 5 + 1} open items and a follow-up visit." for i in range(n // 8 + 1)))
    assert len(ids) >= n, (len(ids), n)
    return ids[:n]


def questions(n: int) -> list[str]:
    """n distinct ~32-token questions."""
    out = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        out.append(f"Question {i + 1}: I run site number {1000 + 37 * i} with {3 + i % 9} units. What should I "
                   f"know about {topic} before I order, and how long does installation usually take?")
    return out


def chat_prompts(tokenizer, n: int) -> list[list[int]]:
    return [tokenizer.encode_chat([{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": q}])
            for q in questions(n)]


def measure_peak_gflops(dtype: torch.dtype = torch.float32, n: int = 2048, reps: int = 5) -> float:
    """GFLOP/s of an n x n matrix product in `dtype`, the best of `reps`. bf16 on a CPU without native bf16 runs
    an emulation of well under 1 GFLOP/s at this size (minutes for 2048): 512 there, still well past the caches."""
    if matmul_peak_dtype(dtype) != dtype:
        n = min(n, 512)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def measure_bandwidth_gbs(nbytes: int = 1 << 29, reps: int = 5) -> float:
    """GB/s of reading a large tensor (a sum over 512 MiB, far past any cache), the median of `reps`: the
    ceiling of a decode step, which streams weights and KV in."""
    x = torch.ones(nbytes // 4, dtype=torch.float32)
    x.sum()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t)
    return nbytes / sorted(times)[reps // 2] / 1e9


def model_bytes_per_token(model) -> int:
    """Bytes one decode step must read of the base model whatever the batch: every weight as stored (the int4
    codes, scales and zeros; not the fast-path copies), the embedding rows aside."""
    from kernels.quant import QuantizedTensor

    def stored(w) -> int:
        if isinstance(w, QuantizedTensor):
            return sum(t.numel() * t.element_size() for t in (w.qweight, w.scales, w.zeros) if t is not None)
        return w.numel() * w.element_size()

    total = stored(model.lm_head)  # tied: the embedding table read as the LM head
    for lw in model.layers:
        total += sum(stored(w) for w in (lw.qkv, lw.o, lw.gate_up, lw.down, lw.input_norm, lw.post_norm))
    return total


def kv_bytes(arch, tokens: int, dtype_bytes: int = 2) -> int:
    """K and V of `tokens` positions over every layer."""
    return 2 * arch.num_layers * arch.num_kv_heads * arch.head_dim * dtype_bytes * tokens


PAIRED = ("single_stream_tok_s", "engine_tok_s", "tok_s_32_adapters", "tok_s_1_adapter", "ratio_single_stream",
          "ratio_batched", "ratio_32_adapters", "long_prompt_ttft_s", "ratio_long_prompt_ttft")


def peer_results() -> dict:
    """The peer's figures from bench/results/peers.json when `make bench ARGS=peers` ran (else nothing), and ours
    from that run as `paired_*`: each timed right beside the peer's run of the same workload (this bench's own
    figures are timed minutes apart from the peer's, and this machine's speed drifts by more than the gap)."""
    path = RESULTS / "peers.json"
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return ({k: v for k, v in data.items() if k.startswith("llamacpp_")} | {"llamacpp_commit": data.get("commit")}
            | {f"paired_{k}": data[k] for k in PAIRED if k in data and "timing" in data})  # (older runs: not paired)


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=10).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def environment() -> dict:
    from kernels.cpu_features import cpu_flags, native_bf16

    simd = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16") if f in cpu_flags()]
    return {"commit": commit(), "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
            "cpu_simd": simd, "cpu_native_bf16": native_bf16(),
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def matmul_peak_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a model computing in `dtype` runs its matrix products in on this CPU (a bf16 model's are float32
    where bf16 is not native, kernels.cpu_features): the peak its roofline is measured in."""
    from kernels.cpu_features import matmul_dtype

    return matmul_dtype(torch.empty(0, dtype=dtype))


def write_result(name: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return path


def report(name: str, title: str, res: dict) -> None:
    """Write `res` to bench/results/<name>.json and print it as a table."""
    path = write_result(name, res)
    print_table(f"{title} (written to {path})",
                [(k, f"{v:.3f}" if isinstance(v, float) else str(v)) for k, v in res.items()])


def print_table(title: str, rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    print(f"\n== {title}")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
