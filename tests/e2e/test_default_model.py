"""The embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF) end to end."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from kernels.ops import AttentionPlan
from service.builder import build_runtime, load_tokenizer
from service.config import EngineConfig, RuntimeConfig
from service.engine.sampling import SamplingParams
from service.runtime.loader import default_model_path, load_model
from service.runtime.model import KVCache, LlamaModel

pytestmark = pytest.mark.slow

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def loaded():
    return load_model(default_model_path())


@pytest.fixture(scope="module")
def prompt_ids():
    tok = load_tokenizer(default_model_path())
    return tok.encode_chat([{"role": "user", "content": QUESTION}])


def our_logits(loaded, ids: list[int], dtype: torch.dtype) -> torch.Tensor:
    model = LlamaModel(loaded.arch, loaded.tensors, dtype=dtype, max_model_len=1024)
    kv = KVCache(loaded.arch, num_blocks=8, block_size=16, dtype=dtype)
    plan = AttentionPlan.build([list(range(8))], [0], [len(ids)], 16)
    with torch.inference_mode():
        return model.compute_logits(model.forward(torch.tensor(ids), torch.arange(len(ids)), plan, kv))


@pytest.fixture(scope="module")
def hf():
    """transformers' model of the same GGUF, dequantized to fp32 (loaded once for the module's tests)."""
    import transformers
    path = default_model_path()
    return transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                             torch_dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_logits(hf, prompt_ids):
    with torch.no_grad():
        return hf(torch.tensor([prompt_ids])).logits[0].float()


def test_default_model_logits_match_transformers_fp32(loaded, prompt_ids, hf_logits):
    """transformers dequantizes the GGUF to fp32; our fp32 path dequantizes the same codes exactly."""
    ours = our_logits(loaded, prompt_ids, torch.float32)
    # 30 layers of fp32 with a different summation order: logits agree to ~1e-3 (they span ~[-30, 30]).
    torch.testing.assert_close(ours, hf_logits, atol=2e-2, rtol=0)
    assert torch.equal(ours.argmax(-1), hf_logits.argmax(-1))


def test_default_model_bf16_fast_path_close(loaded, prompt_ids, hf_logits):
    ours = our_logits(loaded, prompt_ids, torch.bfloat16)
    err = (ours - hf_logits).abs()
    # bf16 activations through 30 layers: mean error stays small, the greedy choice matches almost everywhere.
    assert err.mean() < 0.3, err.mean()
    agree = (ours.argmax(-1) == hf_logits.argmax(-1)).float().mean()
    assert agree >= 0.9, agree
    assert ours[-1].argmax() == hf_logits[-1].argmax()


def test_a_long_prompt_through_the_c_attention_kernel_stays_close_to_transformers(loaded, hf):
    """A ~1,200-token prompt (a document, then a question) in one forward: on bfloat16 its attention is the C kernel's
    (prompts of any length go to it), in runs of 32 new tokens over the prompt's blocks. Against transformers' fp32
    logits at the last 64 positions: the same bounds as the short prompt's bf16 path, and the same next token."""
    tok = load_tokenizer(default_model_path())
    doc = " ".join(f"Record {i}: the warehouse in zone {i % 7} shipped {10 + i % 13} crates on day {i % 28 + 1}."
                   for i in range(60))
    ids = tok.encode_chat([{"role": "user", "content": doc + " Which zone shipped the most crates?"}])
    assert 1000 < len(ids) < 1500, len(ids)
    assert len(ids) > 512  # longer than the bound that used to send a prompt to torch's attention
    bs = 16
    blocks = -(-len(ids) // bs)
    model = LlamaModel(loaded.arch, loaded.tensors, dtype=torch.bfloat16, max_model_len=2048)
    kv = KVCache(loaded.arch, num_blocks=blocks, block_size=bs, dtype=torch.bfloat16)
    plan = AttentionPlan.build([list(range(blocks))], [0], [len(ids)], bs)
    assert plan.native_all() is not None  # the C kernel takes the whole prompt
    with torch.inference_mode():
        hidden = model.forward(torch.tensor(ids), torch.arange(len(ids)), plan, kv)
        ours = model.compute_logits(hidden[-64:])
    with torch.no_grad():
        ref = hf(torch.tensor([ids]), logits_to_keep=64).logits[0].float()
    err = (ours - ref).abs()
    assert err.mean() < 0.3, err.mean()
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9
    assert ours[-1].argmax() == ref[-1].argmax()


def test_min_tokens_never_runs_past_eos_into_the_next_turn():
    """The model's answer is shorter than 16 tokens: min_tokens=16 must keep it from sampling EOS (which
    used to be skipped in the text, the answer running on into the template's next turn)."""
    rt = build_runtime(RuntimeConfig(kv_cache_gib=0.02, max_model_len=512), EngineConfig())
    ids = rt.tokenizer.encode_chat([{"role": "user", "content": QUESTION}])
    eos = rt.tokenizer.eos_token_ids
    free, held = rt.engine.generate([ids, ids], [SamplingParams(max_tokens=40, temperature=0),
                                                 SamplingParams(max_tokens=40, temperature=0, min_tokens=16)])
    assert free.finish_reason.value == "eos" and len(free.token_ids) < 16, free.text
    out = list(held.token_ids)
    assert len(out) >= 16 and not set(out[:16]) & eos, out
    assert "\nuser\n" not in held.text and "\nsystem\n" not in held.text, held.text
    assert held.text.startswith("The capital of France is Paris"), held.text


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "service.cli", *args], capture_output=True, text=True,
                          timeout=600)


def test_cli_answers_capital_of_france():
    r = run_cli("generate", "--prompt", QUESTION, "--temperature", "0", "--max-tokens", "24")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert r.stdout.strip().startswith("The capital of France is Paris")


def test_cli_missing_model_path_is_a_clear_error(tmp_path):
    missing = tmp_path / "nope.gguf"
    r = run_cli("generate", "--prompt", "hi", "--model", str(missing))
    assert r.returncode == 2
    assert str(missing) in r.stderr and "error:" in r.stderr
    assert r.stdout == ""


def test_cli_bad_sampling_values_name_the_allowed_range():
    r = run_cli("generate", "--prompt", "hi", "--temperature", "-1")
    assert r.returncode == 2 and "temperature" in r.stderr and ">= 0" in r.stderr
    r = run_cli("generate", "--prompt", "hi", "--top-p", "1.5")
    assert r.returncode == 2 and "top_p" in r.stderr and "(0, 1]" in r.stderr
    r = run_cli("generate", "--prompt", "hi", "--max-tokens", "0")
    assert r.returncode == 2 and "max_tokens" in r.stderr
