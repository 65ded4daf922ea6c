"""xgrammar behind structured output: the vocabulary it sees, compiles (bad input named, cache, time bound), the
bitmask on the sampler's logits over every sampler path, and a matcher rebuilt from a request's output."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field

import pytest
import torch

from service.builder import load_tokenizer
from service.engine.sampling import SamplingParams
from service.engine.structured import FormatKind, ResponseFormat
from service.runtime.loader import default_model_path
from service.runtime.sampler import sample
from service.runtime.structured import GrammarMasks, StructuredOutput, choice_grammar


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(default_model_path())


@pytest.fixture(scope="module")
def so(tok):
    out = StructuredOutput(tok, tok.vocab_size)
    yield out
    out.close()


def schema(**kw) -> ResponseFormat:
    return ResponseFormat(FormatKind.JSON_SCHEMA, json.dumps(kw))


@dataclass
class Row:
    sampling: SamplingParams
    grammar: object = None
    seed: int = 0
    prompt_token_ids: list[int] = field(default_factory=lambda: [0])
    output_token_ids: list[int] = field(default_factory=list)


def test_vocabulary_blanks_control_tokens_but_keeps_eos_as_the_end(tok, so):
    info = so.info
    assert info.vocab_size == tok.vocab_size
    assert sorted(info.stop_token_ids) == sorted(tok.eos_token_ids)
    im_start = tok.backend.token_to_id("<|im_start|>")
    assert im_start in info.special_token_ids  # never allowed inside a format
    assert not set(info.stop_token_ids) & set(info.special_token_ids)
    # byte-level pieces decode to their text: " Paris" is one token with its space
    paris = tok.encode(" Paris", add_special_tokens=False)
    assert len(paris) == 1 and info.decoded_vocab[paris[0]] == b" Paris"


@pytest.mark.parametrize(("fmt", "named"), [
    (lambda: ResponseFormat(FormatKind.JSON_SCHEMA, "{not json"), "json_schema is not JSON"),
    (lambda: ResponseFormat(FormatKind.JSON_SCHEMA, "[1, 2]"), "must be a JSON object"),
    (lambda: schema(type="strng"), "not a valid JSON Schema at type"),
    (lambda: schema(type="object", properties={"a": {"type": "integer", "minimum": "zero"}}),
     "not a valid JSON Schema at properties/a/minimum"),
    (lambda: schema(**{"$ref": "https://example.com/s.json"}), "only references inside the schema"),
    (lambda: ResponseFormat(FormatKind.REGEX, "(abc"), "regex is invalid or unsupported: Regex parsing error"),
    (lambda: ResponseFormat(FormatKind.REGEX, "a{2,1}"), "regex is invalid or unsupported"),
    (lambda: ResponseFormat(FormatKind.GRAMMAR, 'root ::= yes | "no"'), 'Rule "yes" is not defined'),
    (lambda: ResponseFormat(FormatKind.GRAMMAR, 'start ::= "x"'), "grammar is invalid or unsupported"),
])
def test_bad_formats_are_refused_naming_the_problem(so, fmt, named):
    with pytest.raises(ValueError, match=named.replace("(", r"\(").replace("$", r"\$")) as e:
        so.compile(fmt())
    assert "[" not in str(e.value).split(":")[0]  # no log-line prefix from the C++ side leaks through


def test_compiles_are_cached_by_kind_and_text_within_a_bound(tok):
    so = StructuredOutput(tok, tok.vocab_size, cache_entries=2)
    try:
        a, b, c = (ResponseFormat(FormatKind.REGEX, r) for r in ("[a-z]+", "[0-9]+", "x|y"))
        ga = so.compile(a)
        assert so.compile(ResponseFormat(FormatKind.REGEX, "[a-z]+")) is ga and so.compiles == 1
        # the same text under another kind is another grammar
        assert so.compile(ResponseFormat(FormatKind.GRAMMAR, 'root ::= [a-z]+')) is not ga
        so.compile(b)
        so.compile(c)
        assert so.cache_size == 2 and so.compiles == 4
        assert so.compile(a) is not ga and so.compiles == 5  # evicted (least recently used), compiled again
        with pytest.raises(ValueError):
            so.compile(ResponseFormat(FormatKind.REGEX, "(("))
        with pytest.raises(ValueError):  # a failure is cached too: no second compile of a bad format
            so.compile(ResponseFormat(FormatKind.REGEX, "(("))
        assert so.compiles == 6
    finally:
        so.close()


def test_the_cache_is_bounded_in_bytes_too(tok):
    so = StructuredOutput(tok, tok.vocab_size, cache_mib=0.01)  # ~10 KB: three of these 3.3 KB grammars
    try:
        for i in range(6):
            so.compile(ResponseFormat(FormatKind.JSON_SCHEMA, json.dumps(
                {"type": "object", "properties": {f"k{i}": {"type": "integer"}}, "required": [f"k{i}"]})))
        assert so.cache_size < 6 and 0 < so.cache_nbytes <= so.cache_bytes
        assert so.compiles == 6
    finally:
        so.close()


def test_a_compile_over_the_time_bound_is_refused_and_later_ones_still_work(tok):
    """A schema with many properties takes milliseconds to compile; with a bound far below that, the request is
    refused (ValueError -> INVALID_ARGUMENT) at once while the compile finishes in the background."""
    so = StructuredOutput(tok, tok.vocab_size, compile_timeout_s=0.0005)
    try:
        props = {f"field_{i}": {"type": "string", "pattern": f"^[a-z]{{{i % 7 + 1}}}[0-9]+$"} for i in range(80)}
        big = schema(type="object", properties=props, required=list(props))
        t0 = time.perf_counter()
        with pytest.raises(ValueError, match=r"json_schema took longer than 0.0005 s to compile"):
            so.compile(big)
        assert time.perf_counter() - t0 < 0.5
        assert so.compile(ResponseFormat(FormatKind.REGEX, "[0-9]"), timeout_s=10).format.text == "[0-9]"
    finally:
        so.close()


def test_choice_grammar_escapes_quotes_backslashes_and_newlines(so):
    choices = ['say "hi"', "back\\slash", "two\nlines", "naïve"]
    assert choice_grammar(choices).startswith("root ::= ")
    g = so.compile(ResponseFormat.choice(choices))
    for c in choices:
        m = g.matcher()
        assert m.xgr.accept_string(c) and m.xgr.is_completed(), c
    m = g.matcher()
    assert not m.xgr.accept_string("say hi")


def allowed(so, matcher, output: list[int] | None = None) -> set[int]:
    masks = GrammarMasks(so.vocab_size)
    logits = torch.zeros(1, so.vocab_size)
    masks.apply(logits, masks.start([Row(SamplingParams(), grammar=matcher, output_token_ids=output or [])], 1))
    masks.close()
    return set(torch.nonzero(logits[0] == 0).flatten().tolist())


@pytest.mark.parametrize("params", [
    dict(temperature=0), dict(temperature=1.0), dict(temperature=2.0, top_k=5), dict(temperature=1.0, top_p=0.3),
    dict(temperature=1.0, min_p=0.5), dict(temperature=0, repetition_penalty=2.0),
    dict(temperature=1.0, presence_penalty=-2.0, frequency_penalty=-2.0), dict(temperature=1.0, logprobs=2),
])
def test_every_sampler_path_samples_only_allowed_tokens(tok, so, params):
    """Logits that strongly prefer disallowed tokens: each sampler path still picks an allowed one, rows without a
    format in the same batch keep their own choice, and logprobs stay the model's."""
    g = so.compile(ResponseFormat(FormatKind.REGEX, "[0-9]{2}"))
    ok = allowed(so, g.matcher())
    assert ok and len(ok) < 200
    masks = GrammarMasks(so.vocab_size)
    torch.manual_seed(0)
    base = torch.randn(3, so.vocab_size)
    base[:, 100] = 50.0  # a token outside the format, far ahead of everything else
    for step in range(4):
        sp = SamplingParams(seed=step, **params)
        rows = [Row(sp), Row(sp, grammar=g.matcher(), output_token_ids=[]), Row(sp)]
        logits = base.clone()
        res = sample(logits, rows, (), lambda lg, rows=rows: masks.apply(lg, masks.start(rows, 3)))
        assert res[1].token_id in ok
        assert res[0].token_id == 100 or not sp.greedy
        if sp.logprobs is not None:
            assert res[1].top_logprobs[0][0] == 100  # the model's own preference, unmasked
            assert torch.equal(logits, base)  # masked on a copy: logprobs read the raw logits
    masks.close()


def test_a_matcher_out_of_step_is_rebuilt_from_the_output(tok, so):
    g = so.compile(ResponseFormat(FormatKind.REGEX, "ab(c|d)e"))
    ids = [tok.encode(ch, add_special_tokens=False)[0] for ch in "abd"]
    m = g.matcher()
    m.accept_token(ids[0])
    m.sync(ids)  # one token behind: replayed into a fresh matcher
    assert m.num_accepted == 3
    assert allowed(so, m, ids) == {tok.encode("e", add_special_tokens=False)[0]}
    m.sync(ids)  # in step: nothing to do
    assert m.num_accepted == 3
    with pytest.raises(RuntimeError, match="does not match the response format"):
        g.matcher().sync([tok.encode("z", add_special_tokens=False)[0]])


def test_masks_fill_on_a_worker_thread(tok, so):
    """The fill runs off the caller's thread, so it overlaps the forward pass."""
    g = so.compile(ResponseFormat(FormatKind.REGEX, "[a-z]+"))
    masks = GrammarMasks(so.vocab_size)
    seen = []
    m = g.matcher()
    real_sync = m.sync

    class Spy:
        xgr = m.xgr

        def sync(self, out):
            seen.append(threading.current_thread().name)
            real_sync(out)

    filled = masks.start([Row(SamplingParams(), grammar=Spy())], 1)
    assert filled.result()[0] == [0]
    assert seen and seen[0].startswith("grammar-mask") and seen[0] != threading.current_thread().name
    masks.close()


def test_the_bitmask_grows_on_the_callers_thread_never_on_the_worker(so, monkeypatch):
    """A torch op on the mask worker would start a second intra-op thread pool, which slowed every later forward
    pass by a quarter on 2 cores: the worker runs xgrammar only."""
    import service.runtime.structured as structured

    threads = []
    real = structured.xgr.allocate_token_bitmask

    def spy(*args):
        threads.append(threading.current_thread().name)
        return real(*args)

    monkeypatch.setattr(structured.xgr, "allocate_token_bitmask", spy)
    g = so.compile(ResponseFormat(FormatKind.REGEX, "[a-z]+"))
    masks = GrammarMasks(so.vocab_size)
    rows = [Row(SamplingParams(), grammar=g.matcher()) for _ in range(5)]
    logits = torch.zeros(5, so.vocab_size)
    masks.apply(logits, masks.start(rows, 5))
    masks.close()
    assert len(threads) == 2 and set(threads) == {threading.current_thread().name}  # the first row, then five
    assert bool(torch.isinf(logits).all(dim=1).logical_not().all())  # every row keeps some allowed token


@pytest.mark.parametrize("constrained", [[0, 1, 2, 3], [1, 3], [2]])
def test_the_unpacked_cpu_mask_equals_xgrammars_own_kernel(tok, so, constrained):
    """The CPU path (numpy-unpacked banned tokens, one masked_fill) against xgrammar's apply kernel on the same
    bitmasks, for all rows constrained and for some: identical logits, free rows untouched."""
    formats = [ResponseFormat(FormatKind.JSON_OBJECT), ResponseFormat(FormatKind.REGEX, "[0-9]+(\\.[0-9]+)?"),
               ResponseFormat.choice(["alpha", "beta"]), schema(type="object", properties={"a": {"type": "string"}})]
    prefix = tok.encode('{"a": "x', add_special_tokens=False)
    rows = []
    for i in range(4):
        m = so.compile(formats[i]).matcher() if i in constrained else None
        out = []
        if m is not None and i == 3:
            for t in prefix:
                assert m.accept_token(t)
            out = prefix
        rows.append(Row(SamplingParams(), grammar=m, output_token_ids=out))
    torch.manual_seed(1)
    base = torch.randn(4, so.vocab_size)
    unpacked, packed = GrammarMasks(so.vocab_size), GrammarMasks(so.vocab_size)
    packed.unpack = False  # xgrammar's own kernel (the GPU path's, here on the CPU)
    a, b = base.clone(), base.clone()
    unpacked.apply(a, unpacked.start(rows, 4))
    packed.apply(b, packed.start(rows, 4))
    unpacked.close()
    packed.close()
    assert torch.equal(a, b)
    for i in range(4):
        if i in constrained:
            assert bool(torch.isinf(a[i]).any()) and not bool(torch.isinf(a[i]).all())
        else:
            assert torch.equal(a[i], base[i])
