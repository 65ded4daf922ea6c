"""Speculative decoding (n-gram prompt lookup): speculation on vs off in the same run, on the default model.

Workloads, greedy (the outputs are checked token for token equal on both sides, so both count the same tokens):
- copy-heavy: rewrite or extract from a ~300-token document given in the prompt (return a JSON record with one
  field changed, repeat a text with one name replaced, quote the sentences about a topic); each request ends
  where the model ends it (EOS) or at 320 tokens;
- chat: the mixed workload's prompts (a shared ~256-token system prompt plus a question), 64 output tokens, EOS
  ignored.
Each at batch 1 (requests one at a time), 8 and 64 (submitted at once); on and off alternate, and each figure is
the better of `--repeats` runs (the machine is shared). With llama.cpp's server built (bench/.peers/, see
bench/llamacpp.py), its single stream on the same copy prompts and token counts. Writes
bench/results/speculative.json.
"""

from __future__ import annotations

import argparse
import json
import time

from bench.common import chat_prompts, environment, report, write_result
from service.builder import build_runtime
from service.config import EngineConfig, RuntimeConfig
from service.engine.sampling import SamplingParams
from service.runtime.loader import default_model_path

ORDER = {
    "order_id": "SO-2024-118734", "status": "processing", "customer": {"name": "Harbor Instruments Ltd",
    "contact": "Maria Lindqvist", "email": "m.lindqvist@harbor-instruments.example", "phone": "+46 31 555 0192"},
    "shipping": {"street": "Skeppsbron 14", "city": "Gothenburg", "postcode": "411 21", "country": "Sweden",
                 "method": "express", "carrier": "NordFreight"},
    "items": [
        {"sku": "TL-200-K", "name": "ThermoLine probe, type K, 200 mm", "quantity": 12, "unit_price": 48.5},
        {"sku": "FM-50-SS", "name": "FlowMax meter, DN50, stainless", "quantity": 2, "unit_price": 1290.0},
        {"sku": "PC-10-B", "name": "PressaCore transmitter, 0-10 bar", "quantity": 6, "unit_price": 310.0},
        {"sku": "EB-4G", "name": "EdgeBox controller with LTE modem", "quantity": 1, "unit_price": 845.0},
    ],
    "currency": "EUR", "payment": {"terms": "30 days net", "invoice": "INV-88412"},
    "notes": "Deliver to the loading dock at the back of the building between 8:00 and 15:00.",
}

TEXT = (
    "The EdgeBox controller connects up to sixteen sensors to the SensorCloud platform. Each input accepts "
    "a 4-20 mA or a 0-10 V signal, and the controller samples every channel ten times per second. The EdgeBox "
    "stores up to thirty days of readings locally, so a lost network connection does not lose data. Firmware "
    "updates are delivered over the air and installed at night, when the load on the plant is lowest. The "
    "warranty covers the EdgeBox for three years from the date of delivery, including parts and labour. "
    "Installation takes about two hours for a trained technician, and the mounting kit fits a standard DIN "
    "rail. The controller runs on 24 V DC and draws less than five watts. For outdoor sites, the EdgeBox "
    "should be placed in an enclosure rated IP65 or better. Alerts defined in SensorCloud are evaluated on "
    "the EdgeBox itself, so a threshold alarm still fires when the connection to the cloud is down."
)


def copy_prompts(tokenizer) -> list[list[int]]:
    doc = json.dumps(ORDER, indent=2)
    asks = [
        f'Return this JSON exactly as it is, but with "status" changed to "shipped". Output only the JSON.\n\n{doc}',
        f"Repeat the following text word for word, but write \"EdgeBox Pro\" wherever it says \"EdgeBox\".\n\n{TEXT}",
        f"Quote the sentences of the following text that talk about the warranty and the installation, word for "
        f"word.\n\n{TEXT}",
        f"Return this JSON exactly as it is, but with the quantity of the FlowMax meter changed to 3. Output only "
        f"the JSON.\n\n{doc}",
    ]
    return [tokenizer.encode_chat([{"role": "user", "content": a}]) for a in asks]


def timed(engine, prompts: list[list[int]], sp: SamplingParams, one_at_a_time: bool) -> tuple[float, list]:
    t = time.perf_counter()
    if one_at_a_time:
        outs = [engine.generate([p], sp)[0] for p in prompts]
    else:
        outs = engine.generate(prompts, sp)
    dt = time.perf_counter() - t
    assert all(o.error is None for o in outs), [o.error for o in outs if o.error]
    return dt, outs


def ab(engine, prompts: list[list[int]], sp: SamplingParams, one_at_a_time: bool, repeats: int) -> dict:
    """Speculation on vs off, alternating, the better of `repeats` each. Each side counts its own tokens; with
    bfloat16 a verify pass's logits may differ from a decode's in the last bits (as batching changes them), so
    outputs are compared and the share of identical ones reported (float32 gives identical outputs)."""
    best = {"ngram": float("inf"), "off": float("inf")}
    tokens: dict[str, list[list[int]]] = {}
    stats: dict = {}
    for _ in range(repeats):
        for mode in ("ngram", "off"):
            s0 = engine.stats
            dt, outs = timed(engine, prompts, SamplingParams(**{**sp.__dict__, "speculation": mode}), one_at_a_time)
            s1 = engine.stats
            best[mode] = min(best[mode], dt)
            tokens[mode] = [list(o.token_ids) for o in outs]
            if mode == "ngram":
                stats = {"drafts": s1.spec_draft_tokens - s0.spec_draft_tokens,
                         "accepted": s1.spec_accepted_tokens - s0.spec_accepted_tokens,
                         "verifies": sum(s1.spec_accepted_lengths) - sum(s0.spec_accepted_lengths),
                         "steps": s1.steps - s0.steps}
            else:
                stats["steps_off"] = s1.steps - s0.steps
    n_on = sum(map(len, tokens["ngram"]))
    n_off = sum(map(len, tokens["off"]))
    same = sum(a == b for a, b in zip(tokens["ngram"], tokens["off"], strict=True))
    return {"tokens_on": n_on, "tokens_off": n_off, "on_tok_s": n_on / best["ngram"], "off_tok_s": n_off / best["off"],
            "ratio": (n_on / best["ngram"]) / (n_off / best["off"]), "identical_outputs": same / len(prompts),
            **stats, "outputs": tokens["off"]}


def peer_single_stream(prompts: list[list[int]], counts: list[int], threads: int) -> float | None:
    from bench.llamacpp import SERVER, LlamaServer

    if not SERVER.is_file():
        return None
    server = LlamaServer(default_model_path(), threads=threads, parallel=1)
    try:
        server.complete(prompts[0][:8], 2)  # warm
        t = time.perf_counter()
        for p, n in zip(prompts, counts, strict=True):
            server.complete(p, n)
        return sum(counts) / (time.perf_counter() - t)
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="bench.speculative", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--copy-tokens", type=int, default=320, help="most output tokens of a copy request")
    ap.add_argument("--chat-tokens", type=int, default=64)
    ap.add_argument("--skip-peer", action="store_true")
    ap.add_argument("--max-draft-tokens", type=int, default=EngineConfig.max_draft_tokens,
                    help="the server default under test (engine.max_draft_tokens)")
    ap.add_argument("--draft-token-cost", type=float, default=EngineConfig.draft_token_cost,
                    help="the cost rule under test (engine.draft_token_cost)")
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]

    rt = build_runtime(RuntimeConfig(threads=args.threads), EngineConfig(max_num_seqs=64, max_num_batched_tokens=2048,
                                                                       max_draft_tokens=args.max_draft_tokens,
                                                                       draft_token_cost=args.draft_token_cost))
    engine, tok = rt.engine, rt.tokenizer
    cfg = engine.config
    copy = copy_prompts(tok)
    chat = chat_prompts(tok, max(batches))
    engine.generate([tok.encode(f"warm up {i} " * 20) for i in range(4)], SamplingParams(max_tokens=8, temperature=0))
    copy_sp = SamplingParams(max_tokens=args.copy_tokens, temperature=0)
    chat_sp = SamplingParams(max_tokens=args.chat_tokens, min_tokens=args.chat_tokens, temperature=0, ignore_eos=True)
    res: dict = {"model": default_model_path().name, "dtype": "bfloat16", **environment(),
                 "max_draft_tokens": cfg.max_draft_tokens, "draft_token_cost": cfg.draft_token_cost, "ngram_range": f"{cfg.ngram_min}-{cfg.ngram_max}",
                 "speculative_max_step_tokens": cfg.speculative_max_step_tokens,
                 "copy_prompt_tokens": [len(p) for p in copy], "chat_new_tokens": args.chat_tokens}
    copy_counts: list[int] = []
    for b in batches:
        # batch 1: each copy prompt alone, one after the other; batch b: b requests over the copy prompts at once
        prompts = copy if b == 1 else (copy * -(-b // len(copy)))[:b]
        r = ab(engine, prompts, copy_sp, b == 1, args.repeats)
        if b == 1:
            copy_counts = [len(o) for o in r["outputs"]]
            res["copy_sample_output"] = tok.decode(r["outputs"][0])[:400]
        r.pop("outputs")
        res[f"copy_{b}"] = r
        print(f"copy batch {b}: {r}", flush=True)
    for b in batches:
        r = ab(engine, chat[:b], chat_sp, b == 1, args.repeats)
        r.pop("outputs")
        res[f"chat_{b}"] = r
        print(f"chat batch {b}: {r}", flush=True)
    c1 = res.get("copy_1")
    if c1:
        res["copy_single_stream_speedup"] = c1["ratio"]
        res["copy_single_stream_tok_s"] = c1["on_tok_s"]
        res["acceptance_rate"] = c1["accepted"] / max(1, c1["drafts"])
        # tokens a verify pass yields: the accepted drafts plus the token after them
        res["mean_accepted_len"] = (c1["accepted"] + c1["verifies"]) / max(1, c1["verifies"])
    if "chat_64" in res:
        res["chat_64_ratio"] = res["chat_64"]["ratio"]
    write_result("speculative", res)  # the peer's part below needs a built llama-server; keep ours if it fails
    if c1 and not args.skip_peer:
        peer = peer_single_stream(copy, copy_counts, args.threads)
        if peer is not None:
            res["llamacpp_single_stream_tok_s"] = peer
            res["copy_vs_llamacpp_single_stream"] = res["copy_single_stream_tok_s"] / peer
    res["threads"] = args.threads
    report("speculative", "speculative decoding (on vs off, same run)", res)
    return res


if __name__ == "__main__":
    main()
