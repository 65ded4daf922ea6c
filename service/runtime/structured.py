"""Structured output with xgrammar: the model's vocabulary described once at start, formats compiled off the engine
loop and cached, per-request matchers, and the token bitmask that the sampler applies to constrained rows.

- `StructuredOutput.compile(fmt)` runs on the caller's thread (an RPC thread, never the engine loop): it hands the
  compile to a small executor and waits at most `compile_timeout_s`; a slower compile is refused (ValueError ->
  INVALID_ARGUMENT) while it finishes in the background. Results, failures included, are cached by
  `ResponseFormat.key` (a hash of kind and text) in an LRU bounded by `cache_entries` and `cache_mib`.
- `GrammarMasks` fills the bitmask of the rows to sample on a worker thread while the model's forward pass runs,
  and applies it to exactly those rows' logits (one masked_fill on the CPU; xgrammar's Triton kernel on a GPU).
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import numpy as np
import torch
import xgrammar as xgr

from kernels.threads import serial_thread
from service.engine.structured import FormatKind, ResponseFormat
from service.runtime.tokenizer import Tokenizer

COMPILE_TIMEOUT_S = 10.0
CACHE_ENTRIES = 256
# A compiled JSON schema holds token masks of its states: from ~20 KB to several MB (5 MB measured for 8
# properties with bounded strings), so the cache is bounded in bytes too.
CACHE_MIB = 256
COMPILE_WORKERS = 2
# xgrammar's messages start with "[hh:mm:ss] /path/file.cc:123: " and sometimes "Check failed: (...) is false: ".
_NOISE = re.compile(r"^\[[\d:]+\]\s+\S+:\d+:\s*(Check failed: .*? is false:\s*)?")


class Grammar:
    """A response format compiled for this model's vocabulary (the engine's `CompiledGrammarLike`)."""

    __slots__ = ("format", "compiled")

    def __init__(self, fmt: ResponseFormat, compiled: xgr.CompiledGrammar) -> None:
        self.format = fmt
        self.compiled = compiled

    def matcher(self) -> Matcher:
        return Matcher(self)


class Matcher:
    """One request's matcher (the engine's `GrammarMatcherLike`). `num_accepted` counts the tokens it has taken,
    so the runner can tell a matcher out of step with its request's output and rebuild it (`sync`)."""

    __slots__ = ("grammar", "xgr", "num_accepted")

    def __init__(self, grammar: Grammar) -> None:
        self.grammar = grammar
        self.xgr = xgr.GrammarMatcher(grammar.compiled)
        self.num_accepted = 0

    def accept_token(self, token_id: int) -> bool:
        ok = self.xgr.accept_token(token_id)
        if ok:
            self.num_accepted += 1
        return ok

    def is_terminated(self) -> bool:
        return self.xgr.is_terminated()

    def allows_any_token(self) -> bool:
        if self.xgr.is_terminated():
            return False
        bitmask = xgr.allocate_token_bitmask(1, self.grammar.compiled.tokenizer_info.vocab_size)
        self.xgr.fill_next_token_bitmask(bitmask)
        return bool(bitmask.any())

    def sync(self, output_token_ids: Sequence[int]) -> None:
        """Make the matcher's state the one after `output_token_ids` (replayed into a fresh matcher when it is out
        of step, e.g. after a step failed between sampling and bookkeeping). RuntimeError if they do not match."""
        if self.num_accepted == len(output_token_ids):
            return
        self.xgr = xgr.GrammarMatcher(self.grammar.compiled)
        self.num_accepted = 0
        for t in output_token_ids:
            if not self.accept_token(t):
                raise RuntimeError(f"output token {t} does not match the response format")


def tokenizer_info(tokenizer: Tokenizer, vocab_size: int) -> xgr.TokenizerInfo:
    """xgrammar's view of the vocabulary: every id's piece as the tokenizer spells it, with control tokens blanked
    (xgrammar never allows an empty piece) except the EOS ids, which end a format."""
    backend = tokenizer.backend
    eos = sorted(i for i in tokenizer.eos_token_ids if i < vocab_size)
    pieces = [""] * vocab_size
    for piece, i in backend.get_vocab(with_added_tokens=True).items():
        if i < vocab_size:
            pieces[i] = piece
    for i, added in backend.get_added_tokens_decoder().items():
        if added.special and i < vocab_size and i not in eos:
            pieces[i] = ""
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    spec = json.dumps(decoder)
    if '"ByteLevel"' in spec:
        kind = xgr.VocabType.BYTE_LEVEL
    elif '"ByteFallback"' in spec:
        kind = xgr.VocabType.BYTE_FALLBACK
    else:
        kind = xgr.VocabType.RAW
    prefix = '"Strip"' in spec and kind is xgr.VocabType.BYTE_FALLBACK  # SentencePiece's leading space
    return xgr.TokenizerInfo(pieces, kind, vocab_size=vocab_size, stop_token_ids=eos or None, add_prefix_space=prefix)


class StructuredOutput:
    """Compiles response formats for one model; thread-safe. Build once at start (`tokenizer_info` takes ~25 ms
    on a 49k vocabulary)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, *, compile_timeout_s: float = COMPILE_TIMEOUT_S,
                 cache_entries: int = CACHE_ENTRIES, cache_mib: float = CACHE_MIB,
                 workers: int = COMPILE_WORKERS) -> None:
        if compile_timeout_s <= 0 or cache_entries < 1 or cache_mib <= 0 or workers < 1:
            raise ValueError("compile_timeout_s and cache_mib must be > 0, cache_entries and workers >= 1")
        self.info = tokenizer_info(tokenizer, vocab_size)
        self.vocab_size = vocab_size
        self.compile_timeout_s = compile_timeout_s
        self.cache_entries = cache_entries
        self.cache_bytes = int(cache_mib * 2**20)
        self._sizes: dict[str, int] = {}  # bytes of each cached grammar once compiled
        # Our own cache below (bounded by entries, keyed by kind and text); xgrammar's would keep every grammar.
        self._compiler = xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="grammar-compile", initializer=serial_thread)
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, Future[Grammar]] = OrderedDict()
        self.compiles = 0  # compiles started (cache misses)

    def compile(self, fmt: ResponseFormat, timeout_s: float | None = None) -> Grammar:
        """The compiled grammar of `fmt`, from the cache or compiled now. ValueError naming the problem for a bad
        or unsupported format, or one whose compile takes longer than the time bound."""
        timeout = self.compile_timeout_s if timeout_s is None else timeout_s
        future = self._future(fmt)
        try:
            return future.result(timeout=timeout)
        except FutureTimeout:
            raise ValueError(f"{fmt.field} took longer than {timeout:g} s to compile (the server's bound); "
                             "simplify it") from None

    def _future(self, fmt: ResponseFormat) -> Future[Grammar]:
        key = fmt.key
        with self._lock:
            future = self._cache.get(key)
            if future is not None:
                self._cache.move_to_end(key)
                return future
            self.compiles += 1
            future = self._pool.submit(self._compile_now, fmt)
            self._cache[key] = future
            self._evict()
        future.add_done_callback(lambda f: self._compiled(key, f))
        return future

    def _compiled(self, key: str, future: Future[Grammar]) -> None:
        if future.cancelled() or future.exception() is not None:
            return
        with self._lock:
            if self._cache.get(key) is future:
                self._sizes[key] = future.result().compiled.memory_size_bytes
                self._evict()

    def _evict(self) -> None:
        """Drop least recently used entries past the count or byte bound (the newest always stays)."""
        while len(self._cache) > 1 and (len(self._cache) > self.cache_entries
                                        or sum(self._sizes.values()) > self.cache_bytes):
            key, _ = self._cache.popitem(last=False)
            self._sizes.pop(key, None)

    def _compile_now(self, fmt: ResponseFormat) -> Grammar:
        c = self._compiler
        kind = fmt.kind
        try:
            if kind is FormatKind.JSON_SCHEMA:
                compiled = c.compile_json_schema(check_json_schema(fmt.text), any_whitespace=False)
            elif kind is FormatKind.JSON_OBJECT:
                compiled = c.compile_json_schema('{"type": "object"}', any_whitespace=False)
            elif kind is FormatKind.REGEX:
                compiled = c.compile_regex(fmt.text)
            elif kind is FormatKind.CHOICE:
                compiled = c.compile_grammar(choice_grammar(fmt.choices))
            elif kind is FormatKind.STRUCTURAL_TAG:
                compiled = c.compile_structural_tag(fmt.text)
            else:
                compiled = c.compile_grammar(fmt.text)
        except (RuntimeError, TypeError) as e:  # xgrammar's parse and conversion errors
            raise ValueError(f"{fmt.field} is invalid or unsupported: {_clean(e)}") from None
        except RecursionError:
            raise ValueError(f"{fmt.field} is nested too deeply") from None
        return Grammar(fmt, compiled)

    @property
    def cache_size(self) -> int:
        with self._lock:
            return len(self._cache)

    @property
    def cache_nbytes(self) -> int:
        with self._lock:
            return sum(self._sizes.values())

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def check_json_schema(text: str, field: str = "response_format.json_schema") -> str:
    """The schema's text if it is a JSON Schema document xgrammar can use; ValueError naming the problem (and the
    request's `field` that holds it) if not."""
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{field} is not JSON: {e}") from None
    except RecursionError:
        raise ValueError(f"{field} is nested too deeply") from None
    if not isinstance(schema, (dict, bool)):
        raise ValueError(f"{field} must be a JSON object (a schema), not {type(schema).__name__}")
    import jsonschema

    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "(root)"
        raise ValueError(f"{field} is not a valid JSON Schema at {where}: {e.message}") from None
    ref = _remote_ref(schema)
    if ref is not None:
        raise ValueError(f"{field} uses $ref {ref!r}: only references inside the schema (starting with '#') are "
                         "supported")
    return text


def _remote_ref(node: Any) -> str | None:
    stack = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, dict):
            ref = n.get("$ref")
            if isinstance(ref, str) and not ref.startswith("#"):
                return ref
            stack.extend(n.values())
        elif isinstance(n, list):
            stack.extend(n)
    return None


def choice_grammar(choices: Sequence[str]) -> str:
    """An EBNF grammar whose sentences are exactly `choices` (each a string literal, JSON-escaped)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def _clean(e: Exception) -> str:
    lines = [_NOISE.sub("", line).strip() for line in str(e).strip().splitlines()]
    return " ".join(line for line in lines if line)[:500]


class GrammarMasks:
    """The token masks of one step's constrained rows. `start` fills them on a worker thread (call it before the
    forward pass, so the two overlap); `apply` waits for that and masks those rows' logits in place.

    On the CPU the worker also unpacks the bitmask into a [rows, vocab] bool array of banned tokens with numpy, so
    the sampler's thread only runs one `masked_fill_`: for 64 rows of the default model's 49k vocabulary that is
    ~1.4 ms against ~6 ms for xgrammar's CPU kernel, whose time grows with the banned tokens. On a GPU the packed
    bitmask goes to the device and xgrammar's kernel applies it there.
    """

    def __init__(self, vocab_size: int, device: torch.device | str = "cpu") -> None:
        self.vocab_size = vocab_size
        self.unpack = torch.device(device).type == "cpu"
        self._batch = xgr.BatchGrammarMatcher(max_threads=1)
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="grammar-mask", initializer=serial_thread)
        self._grow(1)

    def _grow(self, rows: int) -> None:
        # [rows, ceil(vocab / 32)] int32, and a numpy view of the same memory for the worker
        self._bitmask = xgr.allocate_token_bitmask(rows, self.vocab_size)
        self._words = self._bitmask.numpy()

    def start(self, rows: Sequence[Any], num_rows: int) -> Future[tuple[list[int], Any]]:
        """Fill the masks of `rows` (the sampled rows in logits order, each a Request) that have a matcher.
        Returns a future of (their indices, their banned-token array on the CPU path)."""
        if self._bitmask.shape[0] < num_rows:
            # Here, not on the worker: a torch op run from a second thread starts a second intra-op thread pool,
            # which slowed every later forward pass on the 2-core machine (measured: -25% tokens/s).
            self._grow(num_rows)
        return self._worker.submit(self._fill, rows)

    def _fill(self, rows: Sequence[Any]) -> tuple[list[int], Any]:
        # xgrammar (C++) and numpy only, no torch op: see start().
        idx = [j for j, r in enumerate(rows) if r.grammar is not None]
        if not idx:
            return idx, None
        matchers = []
        for j in idx:
            m = rows[j].grammar
            m.sync(rows[j].output_token_ids)
            matchers.append(m.xgr)
        self._batch.batch_fill_next_token_bitmask(matchers, self._bitmask, idx)
        if not self.unpack:
            return idx, None
        # bit b of word w is token 32 * w + b: little-endian bytes, little-endian bits; inverted: 1 = banned
        words = np.invert(self._words[idx])
        banned = np.unpackbits(words.view(np.uint8), axis=1, bitorder="little")[:, : self.vocab_size]
        return idx, np.ascontiguousarray(banned)

    def apply(self, logits: torch.Tensor, filled: Future[tuple[list[int], Any]]) -> None:
        """logits: [S, V] of the rows given to `start`; -inf for every token the format does not allow."""
        idx, banned = filled.result()
        if not idx:
            return
        vocab = min(self.vocab_size, logits.shape[1])
        if banned is None:
            bitmask = self._bitmask[: logits.shape[0]].to(logits.device, non_blocking=True)
            xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=vocab, indices=idx)
            return
        mask = torch.from_numpy(banned).view(torch.bool)[:, :vocab]  # [len(idx), vocab]
        if len(idx) == logits.shape[0]:
            logits[:, :vocab].masked_fill_(mask, float("-inf"))
        else:
            rows = torch.tensor(idx, device=logits.device)
            logits.index_copy_(0, rows, logits.index_select(0, rows).masked_fill_(
                torch.nn.functional.pad(mask, (0, logits.shape[1] - vocab)), float("-inf")))

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)
