"""The fused decode layers (kernels/cpu/layers.c through `native.decode_layers`): a decode step's layers in one C
call give bit for bit what the op-by-op path gives (the same kernels in the same order), and only the steps every
one of those kernels takes go there: int4 weights the AVX2 int4 kernel takes, decodes (verify passes included)
of at most `model._fused_rows` tokens, LoRA the SGMV kernel takes. The CPU is taken as one without native bf16
(where the AVX2 int4 kernel serves) and as one with it (the AVX512-BF16 int4 kernel where this CPU has it); the
tests need AVX2 and FMA."""

from __future__ import annotations

import pytest
import torch

from adapters.identity import adapter_version_id
from adapters.peft_format import parse_adapter
from kernels import cpu_features, native, native_matmul, quant_cpu
from kernels.lora import LoraSegments
from kernels.ops import AttentionPlan
from service.runtime.loader import load_model
from service.runtime.lora import LoraSlots, fuse_adapter
from service.runtime.model import KVCache, LlamaModel, LoraStep
from tests.kernels.test_cpu_without_bf16 import _avx2
from tests.runtime.test_lora_model import ADAPTERS
from tests.tiny_models import VOCAB, make_tiny_model

BS = 4  # block size
PROMPT = 13


@pytest.fixture(scope="module", params=["llama-gqa", "llama-tied"])
def tiny_path(request, tmp_path_factory):
    path, _ = make_tiny_model(tmp_path_factory.mktemp("m"), request.param)
    return path


@pytest.fixture(params=[False, True], ids=["no-native-bf16", "native-bf16"])
def model(tiny_path, monkeypatch, request):
    """The tiny model in bf16 as on a CPU without native bf16 or with it: the AVX2 int4 kernel's own row limit with
    no dense copy held (Q4_MAX_M); with native bf16 the AVX512-BF16 int4 kernel's (Q4B_MAX_M) where this CPU has
    it, else the limit the AVX2 kernel has beside bf16 dot products (Q4_BF16_MAX_M)."""
    _avx2()
    monkeypatch.setattr(cpu_features, "_NATIVE_BF16", request.param)
    loaded = load_model(tiny_path, quantize="int4")
    m = LlamaModel(loaded.arch, loaded.tensors, dtype=torch.bfloat16)
    if not request.param:
        assert m._fused_rows == native_matmul.Q4_MAX_M
    else:
        assert m._fused_rows == (quant_cpu.Q4B_MAX_M if native_matmul.q4b_available() else quant_cpu.Q4_BF16_MAX_M)
    g = torch.Generator().manual_seed(7)
    for lw in m.layers:  # transformers initializes every norm weight to 1: make each layer's its own
        for w in (lw.input_norm, lw.post_norm):
            w.copy_(torch.rand(w.shape, generator=g) + 0.5)
    return m


@pytest.fixture
def calls(model, monkeypatch):
    """Each step the model offered to the fused layers: True when they ran it, False when they handed it back."""
    seen: list[bool] = []
    real = model.kernels.decode_layers

    def spy(*a, **kw):
        out = real(*a, **kw)
        seen.append(out is not None)
        return out

    monkeypatch.setattr(model.kernels, "decode_layers", spy)
    return seen


def _prefill(model: LlamaModel, n_seqs: int, seed: int = 0) -> tuple[KVCache, list[list[int]]]:
    """n_seqs sequences of PROMPT tokens in scrambled blocks, prefilled (one step each, fused where the model's
    limit takes PROMPT tokens)."""
    per = 24  # blocks per sequence: room for 96 tokens (the largest fused step is 64 decodes of one sequence)
    kv = KVCache(model.arch, num_blocks=n_seqs * per + 2, block_size=BS, dtype=model.dtype)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(n_seqs * per, generator=g).add(2).tolist()
    tables = [order[i * per:(i + 1) * per] for i in range(n_seqs)]
    for t in tables:
        ids = torch.randint(3, VOCAB, (PROMPT,), generator=g)
        model.forward(ids, torch.arange(PROMPT), AttentionPlan.build([t], [0], [PROMPT], BS), kv)
    return kv, tables


def _step(model: LlamaModel, kv: KVCache, tables: list[list[int]], starts: list[int], seed: int,
          lora: LoraStep | None = None) -> torch.Tensor:
    """One step of single-token entries (sequence tables[i] at position starts[i]); its logits."""
    n = len(starts)
    ids = torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))
    plan = AttentionPlan.build(tables, starts, [1] * n, BS)
    return model.compute_logits(model.forward(ids, torch.tensor(starts), plan, kv, lora))


def _both_ways(model: LlamaModel, kv: KVCache, steps: list[tuple[list[list[int]], list[int]]],
               lora: LoraStep | None = None):
    """The steps run fused and again op by op from the same cache: (logits, arena) of each way."""
    start, limit = kv.arena.clone(), model._fused_rows
    out = []
    for rows in (limit, 0):
        kv.arena.copy_(start)
        model._fused_rows = rows
        logits = [_step(model, kv, tables, starts, seed, lora) for seed, (tables, starts) in enumerate(steps)]
        out.append((torch.stack(logits) if len({lg.shape for lg in logits}) == 1 else logits, kv.arena.clone()))
    model._fused_rows = limit
    return out


def test_decode_steps_of_one_and_several_sequences_are_bit_identical(model, calls):
    """Five decode steps of one sequence, then of three (scrambled blocks, crossing block boundaries): the same
    logits and the same K/V written, to the bit, and every one of these steps ran fused."""
    kv, tables = _prefill(model, 3)
    calls.clear()  # the prefills were offered and handed back
    steps = [([tables[0]], [PROMPT + i]) for i in range(5)]
    steps += [(tables, [PROMPT + 5 + i, PROMPT + i, PROMPT + i]) for i in range(5)]
    before = kv.arena.clone()
    (fused, arena_f), (ops, arena_o) = _both_ways(model, kv, steps)
    assert calls == [True] * len(steps)
    assert torch.equal(arena_f, arena_o)
    for a, b in zip(fused, ops):
        assert torch.equal(a, b)
    assert not torch.equal(arena_f, before)  # the fused steps wrote their K/V


def test_a_verify_pass_and_the_largest_fused_step_are_bit_identical(model, calls):
    """A verify pass (one sequence's consecutive positions, which the attention kernel reads as one sequence of
    several new tokens) beside a decode, and a step of exactly `_fused_rows` tokens: fused, and identical."""
    kv, tables = _prefill(model, 2, seed=1)
    calls.clear()
    limit = model._fused_rows
    v = min(5, limit - 1)  # verify positions: the pass and the decode within the limit
    verify = ([tables[0]] * v + [tables[1]], [PROMPT + i for i in range(v)] + [PROMPT])
    largest = ([tables[0]] * (limit - 1) + [tables[1]], [PROMPT + v + i for i in range(limit - 1)] + [PROMPT + 1])
    (fused, arena_f), (ops, arena_o) = _both_ways(model, kv, [verify, largest])
    assert calls == [True, True]
    assert torch.equal(arena_f, arena_o)
    for a, b in zip(fused, ops):
        assert torch.equal(a, b)


def test_steps_the_fused_layers_cannot_take_run_op_by_op(model, calls, monkeypatch):
    """More tokens than the model's limit are never offered; a prompt chunk beside a decode is offered and runs
    fused, unless the C attention kernel does not read prompt chunks (extends kept off it: then it is handed back
    untouched); a decode after them is fused again."""
    from kernels import attention

    kv, tables = _prefill(model, 2, seed=2)
    limit = model._fused_rows
    # the prefills (13 tokens): fused where the limit holds them, not offered where it does not
    assert calls == ([True, True] if PROMPT <= limit else [])
    calls.clear()
    too_many = AttentionPlan.build([tables[0]] * (limit + 1), [PROMPT + i for i in range(limit + 1)],
                                   [1] * (limit + 1), BS)
    model.forward(torch.randint(3, VOCAB, (limit + 1,)), torch.arange(PROMPT, PROMPT + limit + 1), too_many, kv)
    assert calls == []
    c = min(4, limit - 1)  # the chunk's tokens: the step within the limit, so it is offered
    at = PROMPT + limit + 1

    def mixed():
        plan = AttentionPlan.build(tables, [at, PROMPT], [1, c], BS)
        model.forward(torch.randint(3, VOCAB, (c + 1,)), torch.tensor([at, *range(PROMPT, PROMPT + c)]), plan, kv)

    mixed()
    assert calls == [True]
    monkeypatch.setattr(attention, "NATIVE_EXTENDS", False)
    mixed()  # the same positions again: the chunk's K/V are rewritten to the same values
    assert calls == [True, False]
    _step(model, kv, [tables[1]], [PROMPT + c], seed=3)
    assert calls == [True, False, True]


def _run(model: LlamaModel, kv: KVCache, steps: list[tuple[list[list[int]], list[int], list[int]]]):
    """Steps of any entries (tables, starts, lens), fused (up to the model's limit) and again op by op from the
    same cache: (each step's logits of every new token, the arena) both ways."""
    start, limit = kv.arena.clone(), model._fused_rows
    out = []
    for rows in (limit, 0):
        kv.arena.copy_(start)
        model._fused_rows = rows
        logits = []
        for seed, (tables, starts, lens) in enumerate(steps):
            ids = torch.randint(3, VOCAB, (sum(lens),), generator=torch.Generator().manual_seed(seed))
            positions = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, lens)])
            plan = AttentionPlan.build(tables, starts, lens, BS)
            logits.append(model.compute_logits(model.forward(ids, positions, plan, kv)))
        out.append((logits, kv.arena.clone()))
    model._fused_rows = limit
    return out


def test_prompt_steps_are_bit_identical_fused_and_op_by_op(model, calls):
    """Steps that compute prompt tokens: a whole prompt, a chunk after a cached prefix beside two decodes and a
    second chunk, a prompt longer than the attention kernel's runs of new tokens (MAX_NATIVE_NEW): the same
    logits and K/V fused and op by op, to the bit, and every step within the limit ran fused."""
    from kernels.attention import MAX_NATIVE_NEW

    kv, tables = _prefill(model, 3, seed=6)
    calls.clear()
    limit = model._fused_rows
    long = min(limit - 2, MAX_NATIVE_NEW + 7)  # past one run of new tokens where the limit allows
    steps = [([tables[0]], [PROMPT], [min(9, limit)]),
             (tables, [PROMPT + 9, PROMPT, PROMPT], [3, 1, 1]),
             ([tables[1], tables[2]], [PROMPT + 1, PROMPT + 1], [long, 1])]
    (fused, arena_f), (ops, arena_o) = _run(model, kv, steps)
    assert calls == [True] * len(steps)
    assert torch.equal(arena_f, arena_o)
    for a, b in zip(fused, ops):
        assert torch.equal(a, b)


def test_prompt_steps_past_the_int4_kernels_rows_run_fused_with_the_dense_copy(tiny_path, monkeypatch):
    """With native bf16 and a dense copy of the weights held in the dense bf16 kernel's panels (this CPU's
    AVX512-BF16), the fused layers take steps of up to FUSED_DENSE_MAX_M tokens: a prompt step of 100 tokens
    (past the int4 kernel's 64 rows) and a decode step of 40 sequences' worth of rows run fused, bit for bit as
    op by op; the layers' products there are the dense kernel's (prompt steps at every M, decodes from its
    rows)."""
    _avx2()
    if not native_matmul.gemm_bf16w_available():
        pytest.skip("the dense bf16 kernel needs AVX512-BF16")
    monkeypatch.setattr(cpu_features, "_NATIVE_BF16", True)
    loaded = load_model(tiny_path, quantize="int4")
    m = LlamaModel(loaded.arch, loaded.tensors, dtype=torch.bfloat16, dense_weights_bytes=1 << 30)
    assert m.dense_weights and m._fused_rows == quant_cpu.FUSED_DENSE_MAX_M
    kv = KVCache(m.arch, num_blocks=80, block_size=BS, dtype=m.dtype)
    table = list(range(2, 80))
    steps = [([table], [0], [100]), ([table] * 40, list(range(100, 140)), [1] * 40),
             ([table], [140], [5])]  # the last: a prompt step below the dense kernel's decode rows
    seen: list[bool] = []
    real = m.kernels.decode_layers
    monkeypatch.setattr(m.kernels, "decode_layers", lambda *a, **kw: seen.append((r := real(*a, **kw)) is not None) or r)
    (fused, arena_f), (ops, arena_o) = _run(m, kv, steps)
    assert seen == [True, True, True]  # (op by op: not offered)
    assert torch.equal(arena_f, arena_o)
    for a, b in zip(fused, ops):
        assert torch.equal(a, b)


def test_a_step_a_kernel_refuses_is_handed_back_with_the_residual_untouched(model):
    """Blocks of 128 tokens (beyond the attention kernel's 64): the first layer's attention refuses, the call
    returns None before the residual stream changes, and the op-by-op path then serves the step."""
    kv = KVCache(model.arch, num_blocks=2, block_size=128, dtype=model.dtype)
    plan = AttentionPlan.build([[1]], [0], [1], 128)
    x = torch.randn(1, model.arch.hidden_size)
    before = x.clone()
    hs = torch.randn(1, model.arch.hidden_size).to(torch.bfloat16)
    out = model.kernels.decode_layers(x, hs, model._decode_layers(kv), torch.tensor([0]), model._cos, model._sin,
                                      plan, model.arch.rms_norm_eps, model.scale)
    assert out is None and torch.equal(x, before)
    logits = model.compute_logits(model.forward(torch.tensor([5]), torch.tensor([0]), plan, kv))
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("bad_ctx", [0, -1000], ids=["empty-context", "negative-context"])
def test_a_step_whose_context_length_is_not_positive_is_refused_untouched(model, bad_ctx):
    """Bad input: a sequence's context length (the tokens its attention reads) of 0 or below, beside a valid one.
    The call reads the contexts to size its K/V prefetch lists before any kernel runs: it refuses the step (None)
    with the residual stream unchanged, instead of sizing a list from them."""
    kv, tables = _prefill(model, 2, seed=3)
    plan = AttentionPlan.build(tables, [PROMPT, PROMPT], [1, 1], BS)
    nd = plan.native_all()
    assert nd is not None
    ctx = nd.ctx.clone()
    ctx[0] = bad_ctx
    x = torch.randn(2, model.arch.hidden_size)
    before = x.clone()
    hs = torch.randn(2, model.arch.hidden_size).to(torch.bfloat16)
    out = native.decode_layers(x, hs, model._decode_layers(kv), torch.tensor([PROMPT, PROMPT]), model._cos,
                               model._sin, plan.slot_mapping, nd.q_rows, nd.nq, ctx, nd.tables,
                               model.arch.rms_norm_eps, model.scale)
    assert out is None and torch.equal(x, before)


@pytest.fixture(scope="module")
def lora_setup(tmp_path_factory):
    """A 3-layer tiny model and the four adapters of tests/runtime/test_lora_model.py (ranks 4-32, different
    targets, a layer filter, rank patterns)."""
    import copy

    import peft

    root = tmp_path_factory.mktemp("lora")
    path, hf = make_tiny_model(root, "llama-gqa", layers=3)
    dirs = []
    for i, kw in enumerate(ADAPTERS.values()):
        torch.manual_seed(100 + i)
        pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(init_lora_weights=False, **kw))
        pm.save_pretrained(root / f"a{i}")
        dirs.append(root / f"a{i}")
    return path, dirs


@pytest.mark.parametrize("lora_dtype", [torch.bfloat16, torch.float32], ids=["bf16-adapters", "f32-adapters"])
def test_decodes_of_four_adapters_and_base_rows_are_bit_identical(lora_setup, monkeypatch, lora_dtype):
    """Decode steps of six sequences over four adapters of different ranks and targets (two rows of one, a base
    row between): the fused layers apply the same LoRA deltas as the op-by-op path (the SGMV kernel, once per
    projection group and layer), to the bit, and ran every step."""
    _avx2()
    monkeypatch.setattr(cpu_features, "_NATIVE_BF16", False)
    path, dirs = lora_setup
    loaded = load_model(path, quantize="int4")
    model = LlamaModel(loaded.arch, loaded.tensors, dtype=torch.bfloat16)
    slots = LoraSlots(loaded.arch, max_active=4)
    for slot, d in enumerate(dirs):
        parsed = parse_adapter(d, loaded.arch)
        slots.load(slot, fuse_adapter(parsed, loaded.arch, adapter_version_id(parsed, loaded.model_id), lora_dtype))
    seen: list[bool] = []
    real = model.kernels.decode_layers
    monkeypatch.setattr(model.kernels, "decode_layers", lambda *a, **kw: seen.append(r := real(*a, **kw)) or r)
    kv, tables = _prefill(model, 6, seed=4)
    start = kv.arena.clone()
    segments = LoraSegments.from_token_slots([0, 0, 1, -1, 2, 3])
    lora = LoraStep(segments, slots.table, slots.version)
    steps = [(tables, [PROMPT + i] * 6) for i in range(4)]
    (fused, arena_f), (ops, arena_o) = _both_ways(model, kv, steps, lora)
    assert len(seen) == 6 + 4 and all(r is not None for r in seen)  # the prefills (no adapter) fused too
    assert torch.equal(arena_f, arena_o)
    assert torch.equal(fused, ops)
    assert model._fused_lora_cache[0] == (slots.version, segments)  # cached under this version: later steps reuse it
    # another adapter loaded into slot 0 (a new table version): the fused layers read its weights, not the old
    parsed = parse_adapter(dirs[3], loaded.arch)
    slots.load(0, fuse_adapter(parsed, loaded.arch, adapter_version_id(parsed, loaded.model_id), lora_dtype))
    kv.arena.copy_(start)
    (fused2, _), (ops2, _) = _both_ways(model, kv, steps, LoraStep(segments, slots.table, slots.version))
    assert torch.equal(fused2, ops2) and not torch.equal(fused2[:, 0], fused[:, 0])
    # the adapters did act: without them (fused too) every adapter row differs, the base row (3) does not
    kv.arena.copy_(start)
    (plain, _), _ = _both_ways(model, kv, steps, None)  # (slot 0 now holds the fourth adapter: rows 0, 1 too)
    for row in (0, 1, 2, 4, 5):
        assert not torch.equal(plain[:, row], fused[:, row]), row
    assert torch.equal(plain[:, 3], fused[:, 3])


def test_the_op_by_op_layers_lora_from_the_steps_table_is_bit_identical(lora_setup, monkeypatch):
    """A prefill step of three prompts under three adapters and a base prompt (segments of 13-40 tokens: beyond
    the fused layers), op by op: the LoRA of every layer and group from the step's one table (`sgmv_fused_`, what
    the model does on this CPU path) against one argument list per projection (`sgmv_`), same logits and cache
    to the bit; the table path took every projection of the step."""
    _avx2()
    monkeypatch.setattr(cpu_features, "_NATIVE_BF16", False)
    path, dirs = lora_setup
    loaded = load_model(path, quantize="int4")
    model = LlamaModel(loaded.arch, loaded.tensors, dtype=torch.bfloat16)
    assert model._table_lora
    slots = LoraSlots(loaded.arch, max_active=4)
    for slot, d in enumerate(dirs[:3]):
        parsed = parse_adapter(d, loaded.arch)
        slots.load(slot, fuse_adapter(parsed, loaded.arch, adapter_version_id(parsed, loaded.model_id),
                                      torch.bfloat16))
    lens, token_slots = [13, 40, 21, 17], [0, 1, -1, 2]
    kv = KVCache(loaded.arch, num_blocks=40, block_size=BS, dtype=model.dtype)
    tables, b = [], 1
    for n in lens:
        tables.append(list(range(b, b + -(-n // BS))))
        b += len(tables[-1])
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, VOCAB, (sum(lens),), generator=g)
    positions = torch.cat([torch.arange(n) for n in lens])
    plan = AttentionPlan.build(tables, [0] * 4, lens, BS)
    lora = LoraStep(LoraSegments.from_token_slots([s for s, n in zip(token_slots, lens) for _ in range(n)]),
                    slots.table, slots.version)
    used: list[bool] = []
    real = model.kernels.sgmv_fused_
    monkeypatch.setattr(model.kernels, "sgmv_fused_", lambda *a: used.append(r := real(*a)) or r)
    out = []
    for table_lora in (True, False):
        kv.arena.zero_()
        model._table_lora = table_lora
        out.append((model.forward(ids, positions, plan, kv, lora), kv.arena.clone()))
    assert len(used) == 4 * loaded.arch.num_layers and all(used)  # every group of every layer, once, taken
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])
    base = model.forward(ids, positions, plan, kv)  # and the adapters did change the result
    assert not torch.equal(base, out[0][0])


@pytest.mark.parametrize("dense", [False, True], ids=["int4-kernel", "dense-copy"])
def test_a_prompt_step_of_three_adapters_runs_fused_bit_for_bit(lora_setup, monkeypatch, dense):
    """A prefill step of four prompts (13-40 tokens) under three adapters and the base model, beside two decodes
    of an adapter, on a CPU with native bf16: the fused layers run it (their SGMV calls take the prompt-sized
    segments as the op-by-op table path does) and give the same logits and cache, to the bit; with the dense copy
    held (the dense bf16 kernel's panels, where this CPU has AVX512-BF16) the step's 93 tokens are past the int4
    kernel's rows."""
    _avx2()
    monkeypatch.setattr(cpu_features, "_NATIVE_BF16", True)
    if dense and not native_matmul.gemm_bf16w_available():
        pytest.skip("the dense bf16 kernel needs AVX512-BF16")
    path, dirs = lora_setup
    loaded = load_model(path, quantize="int4")
    model = LlamaModel(loaded.arch, loaded.tensors, dtype=torch.bfloat16, dense_weights_bytes=(1 << 30) * dense)
    slots = LoraSlots(loaded.arch, max_active=4)
    for slot, d in enumerate(dirs[:3]):
        parsed = parse_adapter(d, loaded.arch)
        slots.load(slot, fuse_adapter(parsed, loaded.arch, adapter_version_id(parsed, loaded.model_id),
                                      torch.bfloat16))
    lens, token_slots = [13, 40, 21, 17, 1, 1], [0, 1, -1, 2, 1, 1]
    if sum(lens) > model._fused_rows:
        lens, token_slots = [13, 9, 5, 1], [0, -1, 2, 1]  # the int4 kernel's rows on a CPU without AVX512-BF16
    kv = KVCache(loaded.arch, num_blocks=60, block_size=BS, dtype=model.dtype)
    tables, b = [], 1
    for n in lens:
        tables.append(list(range(b, b + -(-(n + 20) // BS))))
        b += len(tables[-1])
    starts = [0 if n > 1 else 20 for n in lens]  # the decodes at position 20 of their (zero) context
    g = torch.Generator().manual_seed(9)
    ids = torch.randint(3, VOCAB, (sum(lens),), generator=g)
    positions = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, lens)])
    plan = AttentionPlan.build(tables, starts, lens, BS)
    lora = LoraStep(LoraSegments.from_token_slots([s for s, n in zip(token_slots, lens) for _ in range(n)]),
                    slots.table, slots.version)
    seen: list[bool] = []
    real = model.kernels.decode_layers
    monkeypatch.setattr(model.kernels, "decode_layers",
                        lambda *a, **kw: seen.append((r := real(*a, **kw)) is not None) or r)
    out = []
    limit = model._fused_rows
    for rows in (limit, 0):
        kv.arena.zero_()
        model._fused_rows = rows
        out.append((model.compute_logits(model.forward(ids, positions, plan, kv, lora)), kv.arena.clone()))
    assert seen == [True]
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])
    base = model.forward(ids, positions, plan, kv)
    assert not torch.equal(model.compute_logits(base), out[0][0])  # the adapters did act


def test_prompt_steps_tell_every_layer_matmul_so_and_decode_steps_do_not(model, monkeypatch):
    """A step with an entry of several new tokens (a prompt) passes `prompt=True` to each of its layer matmuls, so
    a backend keeps them to the path a whole prompt takes whatever the prefix cache held (kernels.quant_cpu.linear);
    a decode step run op by op passes False, to its layers and to the LM head."""
    seen: list[bool] = []
    real = model.kernels.linear

    def spy(x, w, bias=None, prompt=False):
        seen.append(prompt)
        return real(x, w, bias, prompt)

    monkeypatch.setattr(model.kernels, "linear", spy)
    limit, model._fused_rows = model._fused_rows, 0  # op by op
    kv, tables = _prefill(model, 1)
    assert seen == [True] * (4 * len(model.layers))
    seen.clear()
    _step(model, kv, tables, [PROMPT], seed=5)
    assert seen == [False] * (4 * len(model.layers) + 1)
    # the fused layers are told too (their products then take the dense copy at every M, where one is held)
    model._fused_rows = limit
    told: list[bool] = []
    real_fused = native.decode_layers
    monkeypatch.setattr(native, "decode_layers", lambda *a, **kw: told.append(a[-1]) or real_fused(*a, **kw))
    kv, tables = _prefill(model, 1, seed=1)
    _step(model, kv, tables, [PROMPT], seed=5)
    assert told == [True, False]
