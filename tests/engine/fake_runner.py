"""A fake model runner and tokenizer that make engine tests mean something.

`FakeRunner` keeps a fake KV arena: one slot per (block, offset). For every scheduled position it
writes (token, position, adapter) into the slot the request's block table names; its next token
is a rolling hash of the whole context *read back from the arena* through the block table. A wrong
block table, a stale or evicted cached block, a block shared across extra keys, or a position never
computed therefore changes the token or fails an assertion, exactly like wrong KV would.

With adapter slots (`tests/engine/fake_adapters.py`) the adapter is the version the slot table holds
in `request.lora_slot` (None for -1), not the request's extra_key: a request served from the wrong
slot computes with the wrong adapter, exactly like reading the wrong LoRA weights would.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Sequence

from service.config import EngineConfig
from service.engine.adapters import AdapterAdmission
from service.engine.engine import LLMEngine
from service.engine.types import SampleResult, SchedulerOutput
from tests.engine.fake_adapters import FakeAdapterSlots

VOCAB = 256  # byte tokens; the tokenizer's specials sit above it, so the runner never emits them
EOS = 256
BOS = 257
_MOD = (1 << 61) - 1


def _key_code(extra_key: str | None) -> int:
    return 0 if extra_key is None else zlib.crc32(extra_key.encode()) + 1


def next_token(context: Sequence[tuple[int, int, str | None]], vocab: int = VOCAB) -> int:
    """The model: a deterministic function of every (token, position, extra_key) of the context."""
    h = 0
    for token, pos, key in context:
        h = (h * 1_000_003 + token * 7919 + pos * 31 + _key_code(key)) % _MOD
    return (h >> 7) % vocab


def reference_tokens(prompt: Sequence[int], n: int, extra_key: str | None = None, vocab: int = VOCAB) -> list[int]:
    """What greedy generation of n tokens must produce, computed without any cache."""
    ids = list(prompt)
    out = []
    for _ in range(n):
        t = next_token([(tok, p, extra_key) for p, tok in enumerate(ids)], vocab)
        out.append(t)
        ids.append(t)
    return out


class FakeRunner:
    def __init__(self, num_blocks: int = 64, block_size: int = 4, max_model_len: int = 512, vocab_size: int = VOCAB,
                 slots: FakeAdapterSlots | None = None):
        self.slots = slots
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.arena: list[tuple[int, int, str | None] | None] = [None] * (num_blocks * block_size)
        self.tokens_computed = 0
        self.history: list[list[tuple[str, int, int, bool]]] = []  # per step: (id, start, n, sample)
        self.preempted: list[str] = []  # request ids, in preemption order
        self.fail_next = 0  # raise in the next this-many steps
        self.adapters_per_step: list[set[str]] = []  # distinct adapter versions computed per step
        self.drafts_seen = 0  # draft tokens computed in verify passes

    def _slot(self, block_ids: Sequence[int], pos: int) -> int:
        return block_ids[pos // self.block_size] * self.block_size + pos % self.block_size

    def _adapter(self, request) -> str | None:
        if self.slots is None:
            return request.extra_key
        if request.lora_slot == -1:
            return None
        assert self.slots.users[request.lora_slot] > 0, f"{request.request_id} runs from a slot nobody holds"
        return self.slots.version_in(request.lora_slot)

    def execute(self, out: SchedulerOutput) -> list[SampleResult | None]:
        if self.fail_next:
            self.fail_next -= 1
            raise RuntimeError("injected runner failure")
        self.preempted.extend(out.preempted_ids)
        self.history.append([(c.request.request_id, c.start, c.num_tokens, c.sample) for c in out.chunks])
        assert out.num_batched_tokens == sum(c.num_tokens for c in out.chunks)
        adapters = {a for c in out.chunks if (a := self._adapter(c.request)) is not None}
        if self.slots is not None:
            assert len(adapters) <= self.slots.max_active, f"{len(adapters)} adapters in one step: {adapters}"
        self.adapters_per_step.append(adapters)
        # Write every chunk's KV first, then read, as a forward pass does.
        for c in out.chunks:
            r = c.request
            drafts = list(c.draft_token_ids)
            assert c.start == r.num_computed_tokens and c.start + c.num_tokens - len(drafts) <= r.num_tokens
            if drafts:
                assert c.sample and c.start + 1 == r.num_tokens and c.num_tokens == 1 + len(drafts)
                self.drafts_seen += len(drafts)
            tokens = r.all_token_ids[c.start:c.start + c.num_tokens - len(drafts)] + drafts
            for i, tok in enumerate(tokens):
                p = c.start + i
                self.arena[self._slot(r.block_ids, p)] = (tok, p, self._adapter(r))
            self.tokens_computed += c.num_tokens
        results: list[SampleResult | None] = []
        for c in out.chunks:
            if not c.sample:
                results.append(None)
                continue
            r = c.request
            context = []
            for p in range(c.start + c.num_tokens):
                entry = self.arena[self._slot(r.block_ids, p)]
                assert entry is not None, f"{r.request_id}: position {p} read from a slot never written"
                assert entry[1] == p, f"{r.request_id}: slot for position {p} holds position {entry[1]}"
                context.append(entry)
            if not c.draft_token_ids:
                results.append(SampleResult(self.choose(r, context), logprob=-1.0))
                continue
            # A verify pass: the target after each of its positions, the drafts before it taken as accepted.
            first = c.start + 1
            results.append([SampleResult(self.choose(r, context[:first + j], j), logprob=-1.0)
                            for j in range(c.num_tokens)])
        return results

    def choose(self, request, context, ahead: int = 0) -> int:
        """The next token after `context`; `ahead`: how many drafts it already holds past the request's tokens."""
        return next_token(context, self.vocab_size)


class ScriptedRunner(FakeRunner):
    """Same arena checks, but request `id` emits `script[id]` in order (then token 0)."""

    def __init__(self, script: dict[str, list[int]], **kw):
        super().__init__(**kw)
        self.script = script

    def choose(self, request, context, ahead: int = 0) -> int:
        seq = self.script.get(request.request_id, [])
        n = request.num_output_tokens + ahead
        return seq[n] if n < len(seq) else 0


class ByteTokenizer:
    """Byte-level tokenizer: ids 0..255 are bytes, 256 EOS, 257 BOS, 258.. multi-byte merges (some of
    which end in the middle of a UTF-8 character, like real byte-level BPE merges)."""

    MERGES = [b"ab", "é".encode()[:1] + b"x", "日".encode()[:2], "日本".encode()[2:5], b" the"]

    def __init__(self) -> None:
        self.eos_token_ids = frozenset({EOS})
        self._pieces: dict[int, bytes] = {i: bytes([i]) for i in range(256)}
        for i, m in enumerate(self.MERGES):
            self._pieces[258 + i] = m

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        parts = []
        for t in ids:
            if t in (EOS, BOS):
                if not skip_special_tokens:
                    parts.append(b"<eos>" if t == EOS else b"<bos>")
                continue
            parts.append(self._pieces[t])
        return b"".join(parts).decode("utf-8", errors="replace")


def make_engine(
    num_blocks: int = 64, block_size: int = 4, max_model_len: int = 512, runner: FakeRunner | None = None,
    slots: FakeAdapterSlots | None = None, max_overtake_steps: int = 8, **cfg
) -> LLMEngine:
    """An engine on the fake runner; with `slots`, serving adapters through an AdapterAdmission."""
    runner = runner or FakeRunner(num_blocks=num_blocks, block_size=block_size, max_model_len=max_model_len,
                                  slots=slots)
    assert runner.slots is slots, "give the slots to the runner too"
    admission = AdapterAdmission(slots, max_overtake_steps) if slots is not None else None
    clock = cfg.pop("clock", time.monotonic)
    return LLMEngine(runner, ByteTokenizer(), EngineConfig(block_size=runner.block_size, **cfg),
                     admission=admission, adapter_slots=slots, clock=clock)


def prompt(n: int, seed: int = 0) -> list[int]:
    """A deterministic prompt of n byte tokens."""
    return [(seed * 131 + i * 17 + (i * i) % 13) % VOCAB for i in range(n)]
