"""Incremental detokenization with stop strings (torch-free).

Two stages, each with one job:

- `IncrementalDecoder` turns token ids into text deltas. A byte-level BPE token can end in the middle
  of a UTF-8 sequence; decoding it alone gives U+FFFD. It decodes a small window of recent tokens
  (`prefix_offset:`) and emits only what lies past the text of the already-emitted part
  (`prefix_offset:read_offset`), holding back while the window's text ends with U+FFFD.
- `StopStringMatcher` takes those deltas, cuts the text at the first stop string (which is not returned,
  unless the request asks to keep it: then the text ends right after it), and holds back any tail that could
  still grow into a stop string, so no client ever sees part of a stop string that did not end the text.
"""

from __future__ import annotations

from collections.abc import Sequence

from service.engine.sampling import SamplingParams
from service.engine.types import TokenizerLike

_REPLACEMENT = "\ufffd"
# Prompt tokens decoded in front of the output: some tokenizers (SentencePiece) drop a token's
# leading space when it starts the decoded text, so the first output token needs left context.
_PROMPT_CONTEXT = 5


class IncrementalDecoder:
    def __init__(self, tokenizer: TokenizerLike, prompt_token_ids: Sequence[int], skip_special_tokens: bool) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        context = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        if tokenizer.decode(context, skip_special_tokens).endswith(_REPLACEMENT):
            context = []  # the prompt ends mid-character: its text is not a prefix of what follows
        # ids[0:read] are already emitted; ids[prefix:read] is the window re-decoded for context.
        self._ids = context
        self._prefix = 0
        self._read = len(context)

    def add(self, token_id: int) -> str:
        self._ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """Emit whatever is held back, incomplete characters included (as U+FFFD)."""
        return self._advance(final=True) if self._read < len(self._ids) else ""

    def _advance(self, final: bool) -> str:
        ids = self._ids
        decode = self._tokenizer.decode
        prefix_text = decode(ids[self._prefix:self._read], self._skip)
        new_text = decode(ids[self._prefix:], self._skip)
        if not final and (len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT)):
            return ""
        # Keep only the new window; older ids are never decoded again.
        del ids[:self._read]
        self._prefix, self._read = 0, len(ids)
        return new_text[len(prefix_text):]


class StopStringMatcher:
    def __init__(self, stop: Sequence[str], include: bool = False) -> None:
        """`include`: the stop string that ends the text is kept, at its end."""
        self._stop = tuple(stop)
        self._include = include
        self._text = ""  # all text received, held-back tail included
        self._emitted = 0  # self._text[:_emitted] has been returned
        self.stopped = False

    @property
    def text(self) -> str:
        """Text released so far: never a possible start of a stop string, nor a stop string but, when it is kept
        (`include`), the one that ended the text, at its end."""
        return self._text[:self._emitted]

    def feed(self, delta: str, check: bool = True) -> str:
        """Add decoded text; return the part now safe to stream. With `check` False (before
        min_tokens) stop strings do not end the text, but possible starts are still held back."""
        if self.stopped:
            return ""
        old_len = len(self._text)
        self._text += delta
        if not self._stop:
            return self._release(len(self._text))
        if check:
            found = self._find_stop(old_len)
            if found is not None:
                cut = found[0] + len(found[1]) if self._include else found[0]
                self._text = self._text[:cut]
                self.stopped = True
                return self._release(cut)
        return self._release(len(self._text) - self._held_back())

    def flush(self) -> str:
        return self._release(len(self._text))

    def _find_stop(self, old_len: int) -> tuple[int, str] | None:
        """(where, which) of the stop string generation stops at: the one completed first (it ends earliest: a
        delta may hold several characters); of those ending at the same character, the one starting earliest."""
        # A new match must end inside the new text, and cannot start in text already released.
        text = self._text
        best = None
        for s in self._stop:
            i = text.find(s, max(self._emitted, old_len - len(s) + 1))
            if i != -1 and (best is None or (i + len(s), i) < (best[0] + len(best[1]), best[0])):
                best = (i, s)
        return best

    def _held_back(self) -> int:
        """Length of the longest unreleased tail that is a proper prefix of some stop string."""
        text = self._text
        n = len(text)
        best = 0
        for s in self._stop:
            j = text.find(s[0], max(self._emitted, n - len(s) + 1))
            while j != -1:
                if s.startswith(text[j:]):
                    best = max(best, n - j)
                    break
                j = text.find(s[0], j + 1)
        return best

    def _release(self, upto: int) -> str:
        out = self._text[self._emitted:upto]
        self._emitted = max(self._emitted, upto)
        return out


class Detokenizer:
    """Token ids in, streamable text deltas out, for one request."""

    def __init__(self, tokenizer: TokenizerLike, prompt_token_ids: Sequence[int], sampling: SamplingParams) -> None:
        self._decoder = IncrementalDecoder(tokenizer, prompt_token_ids, sampling.skip_special_tokens)
        self._matcher = StopStringMatcher(sampling.stop, sampling.include_stop_str_in_output)

    @property
    def text(self) -> str:
        return self._matcher.text

    @property
    def stopped(self) -> bool:
        """A stop string matched; the text ends before it."""
        return self._matcher.stopped

    def add_token(self, token_id: int, check_stop: bool = True) -> str:
        return self._matcher.feed(self._decoder.add(token_id), check_stop)

    def finish(self) -> str:
        """The request ended: release everything held back."""
        tail = self._matcher.feed(self._decoder.flush(), check=False)
        return tail + self._matcher.flush()
