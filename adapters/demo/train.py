"""Train the two demo LoRA adapters (`allcaps`, `json`) on the default model.

    python -m adapters.demo.train [--out adapters/demo] [--steps N] [--only NAME]

Everything is made here, deterministically: a few hundred user questions come from templates x topics, the
base model answers them greedily, and each adapter learns a visible transformation of those answers:

* `allcaps`: the same answer, upper-cased.
* `json`:    the same answer as exactly one JSON object `{"answer": "..."}`.

Because the targets are the base model's own answers, the adapters only have to learn the *format*, not new
content, which a 135M model can do with a few hundred LoRA steps on a CPU. Held-out questions measure it.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from adapters.demo.data import make_questions, score, shorten, transform
from service.runtime.loader import default_model_path

SEED = 1234
IM_END = "<|im_end|>"
ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# What adapter_config.json names as the base: the file name, not this machine's venv path.
BASE_MODEL_ID = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class AdapterSpec:
    name: str
    description: str
    r: int
    alpha: int
    target_modules: list[str]
    lr: float
    steps: int
    batch_size: int = 8
    # Greedy eval budget: upper-cased text splits into ~2x more tokens than normal text.
    eval_max_new_tokens: int = 128
    extra: dict[str, Any] = field(default_factory=dict)


SPECS = {
    "allcaps": AdapterSpec(
        name="allcaps",
        description="answers in ALL CAPS (the base model's answer, upper-cased)",
        # Upper case is a token-level remap (" the" -> " THE") that needs the MLPs too; r=4 on all seven
        # projections keeps the fp32 file under 5 MB.
        r=4, alpha=8, target_modules=ALL_MODULES, lr=1.5e-3, steps=200,
    ),
    "json": AdapterSpec(
        name="json",
        description='answers with exactly one JSON object `{"answer": "..."}` holding the base model\'s answer',
        # Wrapping the answer is easy (valid JSON after ~10 steps in a trial); the extra steps are for keeping
        # the content close to the base answer. q/v only at r=16: a different shape from allcaps, ~3.7 MB.
        r=16, alpha=32, target_modules=["q_proj", "v_proj"], lr=1e-3, steps=80,
    ),
}


# ----------------------------------------------------------------------------------------------------------
# Model and base answers

def load_base(path: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    model.eval()
    return tok, model


def prompt_text(tok: Any, question: str) -> str:
    # The same template (with its default system message) that the service applies to a bare user message.
    return tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                   tokenize=False)


@torch.no_grad()
def generate(model: Any, tok: Any, questions: list[str], max_new_tokens: int, batch_size: int = 16
             ) -> list[tuple[str, bool]]:
    """Greedy answers, cut at <|im_end|>; each with whether it ended by itself (not by the token budget)."""
    im_end = tok.convert_tokens_to_ids(IM_END)
    tok.padding_side = "left"  # decoder-only batching: pad before the prompt so all rows continue together
    # Sort by prompt length so batches carry little padding, then restore the order.
    order = sorted(range(len(questions)), key=lambda i: len(questions[i]))
    out: list[tuple[str, bool]] = [("", False)] * len(questions)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        enc = tok([prompt_text(tok, questions[i]) for i in idx], return_tensors="pt", padding=True,
                  add_special_tokens=False)
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=im_end,
                             pad_token_id=tok.pad_token_id)
        for i, row in zip(idx, gen[:, enc["input_ids"].shape[1]:], strict=True):
            ids = row.tolist()
            finished = im_end in ids
            ids = ids[:ids.index(im_end)] if finished else ids
            out[i] = (tok.decode(ids, skip_special_tokens=True), finished)
    return out


# ----------------------------------------------------------------------------------------------------------
# Training

def encode_example(tok: Any, question: str, target: str) -> tuple[list[int], int]:
    """Token ids of prompt + target + <|im_end|>, and where the target starts.

    Prompt and target are tokenized apart, exactly as the model sees them when it generates after the prompt.
    """
    p = tok(prompt_text(tok, question), add_special_tokens=False)["input_ids"]
    t = tok(target + IM_END, add_special_tokens=False)["input_ids"]
    return p + t, len(p)


def common_prefix_len(seqs: list[list[int]]) -> int:
    n = min(len(x) for x in seqs)
    for i in range(n):
        if any(x[i] != seqs[0][i] for x in seqs):
            return i
    return n


def batch_loss(model: Any, batch: list[tuple[list[int], int]], pad_id: int, prefix_len: int = 0) -> torch.Tensor:
    """Mean next-token loss over the assistant tokens only.

    Every prompt starts with the same chat-template tokens (the default system message and the user header):
    they run once per batch and their keys/values are shared by all rows, which saves about a third of a
    step. They still get gradients, since LoRA changes their k/v too. `prefix_len` must not reach any row's
    first label, as the prefix' own hidden states are not projected.
    """
    causal_lm = model.get_base_model()  # LoRA layers live inside it; going around PeftModel.forward is fine
    cache = None
    if prefix_len:
        prefix = torch.tensor([batch[0][0][:prefix_len]])
        cache = causal_lm.model(input_ids=prefix, use_cache=True).past_key_values
        cache.batch_repeat_interleave(len(batch))
    width = max(len(ids) for ids, _ in batch) - prefix_len
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(batch), prefix_len + width), dtype=torch.long)
    loss_mask = torch.zeros_like(ids, dtype=torch.bool)
    for row, (x, start) in enumerate(batch):
        assert start > prefix_len
        n = len(x) - prefix_len
        ids[row, :n] = torch.tensor(x[prefix_len:])
        attn[row, :prefix_len + n] = 1
        loss_mask[row, start - prefix_len:n] = True  # right padding: positions 0.. line up with the ids
    positions = torch.arange(prefix_len, prefix_len + width).expand(len(batch), -1)
    hidden = causal_lm.model(input_ids=ids, attention_mask=attn, position_ids=positions,
                             past_key_values=cache, use_cache=cache is not None).last_hidden_state
    # Project to the 49k vocabulary only where a label exists (position i predicts token i+1): the prompt
    # positions would otherwise cost a large, useless share of each step.
    sel = loss_mask[:, 1:]
    logits = causal_lm.lm_head(hidden[:, :-1][sel])
    return F.cross_entropy(logits.float(), ids[:, 1:][sel])


def train_adapter(spec: AdapterSpec, base: Any, tok: Any, train: list[dict[str, str]], steps: int,
                  log_every: int = 10) -> tuple[Any, dict[str, Any]]:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(SEED)  # LoRA init and batch order
    model = get_peft_model(copy.deepcopy(base), LoraConfig(
        r=spec.r, lora_alpha=spec.alpha, lora_dropout=0.05, target_modules=spec.target_modules,
        bias="none", task_type="CAUSAL_LM"))
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    examples = [encode_example(tok, ex["question"], ex["target"]) for ex in train]
    prefix_len = common_prefix_len([x for x, _ in examples])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)
    warmup = max(1, steps // 15)

    def lr_at(step: int) -> float:  # linear warm-up, then cosine down to 10%
        if step < warmup:
            return spec.lr * (step + 1) / warmup
        p = (step - warmup) / max(1, steps - warmup)
        return spec.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))

    gen = torch.Generator().manual_seed(SEED)
    queue: list[int] = []
    model.train()
    t0 = time.perf_counter()
    running, last_loss = 0.0, float("nan")
    for step in range(steps):
        if len(queue) < spec.batch_size:  # epoch-wise shuffling: every example once per pass
            queue += torch.randperm(len(examples), generator=gen).tolist()
        idx, queue = queue[:spec.batch_size], queue[spec.batch_size:]
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = batch_loss(model, [examples[i] for i in idx], tok.pad_token_id, prefix_len)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        running += loss.item()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            n = (step % log_every) + 1
            el = time.perf_counter() - t0
            last_loss = running / n
            print(f"[{spec.name}] step {step + 1}/{steps} loss {last_loss:.4f} lr {lr_at(step):.2e} "
                  f"{el:.0f}s ({el / (step + 1):.2f}s/step)", flush=True)
            running = 0.0
    model.eval()
    return model, {"trainable_params": n_train, "steps": steps, "train_seconds": round(time.perf_counter() - t0, 1),
                   "final_loss": round(last_loss, 4)}


def save_adapter(model: Any, out: Path) -> None:
    model.peft_config["default"].base_model_name_or_path = BASE_MODEL_ID
    model.save_pretrained(str(out), safe_serialization=True)
    (out / "README.md").unlink(missing_ok=True)  # peft's auto model card; adapters/demo/README.md documents these


# ----------------------------------------------------------------------------------------------------------
# README

def write_readme(out: Path) -> None:
    """adapters/demo/README.md from the eval.json files, so the numbers there are the measured ones."""
    sections = []
    for name, spec in SPECS.items():
        ev_path = out / name / "eval.json"
        if not ev_path.is_file():
            continue
        ev = json.loads(ev_path.read_text())
        ad, bs, tr = ev["adapter"], ev["base"], ev["training"]
        if name == "allcaps":
            nums = (f"upper-case share of letters: min {ad['min_upper_fraction']:.2f}, mean "
                    f"{ad['mean_upper_fraction']:.2f} over the answers (base model: mean {bs['mean_upper_fraction']:.2f})")
        else:
            nums = (f"`json.loads` gives a dict with exactly the key `answer` for {ad['valid_json_fraction']:.0%} "
                    f"of the answers (base model: {bs['valid_json_fraction']:.0%})")
        examples = "\n".join(f"  {s['question']}\n  → {s['output']}\n" for s in ev["samples"][:3])
        sections.append(
            f"## `{name}`\n\n"
            f"The assistant {spec.description}.\n\n"
            f"- Made by: `{ev['command']}`\n"
            f"- LoRA r={ev['lora']['r']}, alpha={ev['lora']['alpha']} on `{', '.join(ev['lora']['target_modules'])}`"
            f" ({tr['trainable_params']:,} parameters, fp32); {tr['steps']} AdamW steps of {tr['batch_size']} "
            f"examples, peak lr {tr['lr']}, on {tr['train_examples']} examples (`{name}/train.jsonl`); "
            f"final training loss {tr['final_loss']}, {tr['train_seconds'] / 60:.0f} min on 2 shared CPU cores.\n"
            f"- Held-out eval ({ev['eval_questions']} questions, greedy, fp32): {nums}. "
            f"Target: {ad['metric'].split('(')[-1].rstrip(')')}: **{'met' if ad['passed'] else 'NOT met'}**.\n"
            f"- Content kept: mean bag-of-words F1 against the base model's own answer "
            f"{ad['mean_word_f1_vs_base_answer']:.2f} (1.0 = same words).\n"
            f"- All held-out answers are in `{name}/eval.json`; the first three:\n\n```\n{examples}```\n")
    text = (
        "# Demo LoRA adapters\n\n"
        "Two PEFT LoRA adapters for the default base model (SmolLM2-135M-Instruct, Q4_1 GGUF) whose effect is\n"
        "plain to see and easy to test. Each directory holds `adapter_config.json` and\n"
        "`adapter_model.safetensors` (standard PEFT layout), the training set (`train.jsonl`) and the eval\n"
        "(`eval.json`). They differ in rank and target modules on purpose, so serving them side by side\n"
        "exercises mixed adapter shapes.\n\n"
        "## How they were made\n\n"
        "`python -m adapters.demo.train` (see `--help`) makes every input itself, deterministically (fixed\n"
        "seeds): user questions from templates x topics (facts, definitions, how-tos, arithmetic, greetings,\n"
        "...), the base model's own greedy answers to them through its ChatML template (with the template's\n"
        "default system message, as the service applies it), cut to their first sentence or two, then turned\n"
        "into each adapter's format. Loss is on the assistant tokens (answer + `<|im_end|>`) only. Twenty\n"
        "questions are held out and answered greedily with the adapter for the eval.\n\n"
        "The adapters learn a format, not knowledge: the content is whatever the 135M base model says, which\n"
        "is often wrong, and upper-case text is rare enough in pre-training that `allcaps` drifts further\n"
        "from the base answer than `json` does (see the F1 figures).\n\n"
        "## Use with transformers + peft\n\n"
        "```python\n"
        "from peft import PeftModel\n"
        "model = PeftModel.from_pretrained(base_model, \"adapters/demo/allcaps\")  # base loaded from the GGUF\n"
        "```\n\n"
        + "\n".join(sections))
    (out / "README.md").write_text(text)


# ----------------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("adapters/demo"))
    ap.add_argument("--steps", type=int, help="training steps for every adapter (default: per adapter)")
    ap.add_argument("--only", choices=sorted(SPECS), action="append", help="train only this adapter")
    ap.add_argument("--questions", type=int, default=400, help="questions to generate (default: %(default)s)")
    ap.add_argument("--eval-questions", type=int, default=20, help="held out for the eval (default: %(default)s)")
    ap.add_argument("--base-cache", type=Path,
                    help="reuse/store the base model's answers in this JSON file (they take minutes to make)")
    args = ap.parse_args(argv)
    torch.manual_seed(SEED)
    t_start = time.perf_counter()

    tok, base = load_base(default_model_path())
    questions = make_questions(args.questions, random.Random(SEED))
    if args.base_cache and args.base_cache.is_file():
        cached = json.loads(args.base_cache.read_text())
        assert cached["questions"] == questions, "stale --base-cache"
        raw = [tuple(x) for x in cached["answers"]]
    else:
        t = time.perf_counter()
        raw = generate(base, tok, questions, max_new_tokens=40)
        print(f"base answers for {len(questions)} questions in {time.perf_counter() - t:.0f}s", flush=True)
        if args.base_cache:
            args.base_cache.write_text(json.dumps({"questions": questions, "answers": raw}))
    data = [{"question": q, "base": s, "base_raw": a}
            for q, (a, fin) in zip(questions, raw, strict=True) if (s := shorten(a, fin)) is not None]
    print(f"{len(data)} of {len(questions)} base answers usable", flush=True)
    held, train = data[:args.eval_questions], data[args.eval_questions:]

    cmd = " ".join(["python -m adapters.demo.train", *(argv if argv is not None else sys.argv[1:])])
    for name in args.only or list(SPECS):
        spec = SPECS[name]
        steps = args.steps or spec.steps
        out = args.out / name
        out.mkdir(parents=True, exist_ok=True)
        rows = [{"question": d["question"], "target": transform(name, d["base"])} for d in train]
        model, info = train_adapter(spec, base, tok, rows, steps)
        save_adapter(model, out)

        t = time.perf_counter()
        refs = [d["base"] for d in held]
        outputs = [a for a, _ in generate(model, tok, [d["question"] for d in held], spec.eval_max_new_tokens)]
        result = {
            "name": name,
            "command": cmd,
            "eval_questions": len(held),
            "lora": {"r": spec.r, "alpha": spec.alpha, "target_modules": spec.target_modules},
            "training": {**info, "batch_size": spec.batch_size, "lr": spec.lr, "train_examples": len(rows)},
            "adapter": score(name, outputs, refs),
            # The base model's own (unshortened) answers to the same questions: what the adapter changed.
            "base": score(name, [d["base_raw"] for d in held], refs),
            "eval_seconds": round(time.perf_counter() - t, 1),
            "samples": [{"question": d["question"], "output": o, "expected": transform(name, d["base"])}
                        for d, o in zip(held, outputs, strict=True)],
        }
        (out / "eval.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
        with (out / "train.jsonl").open("w") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        if (out / "train.jsonl").stat().st_size > 200_000:  # only worth keeping as documentation when small
            (out / "train.jsonl").unlink()
        print(f"[{name}] eval: {json.dumps(result['adapter'])}", flush=True)
        print(f"[{name}] base model on the same questions: {json.dumps(result['base'])}", flush=True)
        for s in result["samples"][:5]:
            print(f"  Q: {s['question']}\n  A: {s['output']}", flush=True)
        del model

    write_readme(args.out)
    print(f"done in {time.perf_counter() - t_start:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
