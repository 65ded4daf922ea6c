"""Streaming text: multi-byte characters split across tokens, stop strings across token boundaries."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from service.engine.detokenizer import Detokenizer, IncrementalDecoder, StopStringMatcher
from service.engine.request import RequestSpec
from service.engine.sampling import SamplingParams
from service.engine.types import FinishReason
from tests.engine.fake_runner import ByteTokenizer, ScriptedRunner, make_engine

TOK = ByteTokenizer()
TEXT = "Voilà: café, 日本語 and 🦙 done"


def byte_ids(text: str) -> list[int]:
    return list(text.encode())


def with_merges(text: str) -> list[int]:
    """Tokenize greedily with the tokenizer's merges, some of which end mid-character."""
    raw, ids, i = text.encode(), [], 0
    pieces = sorted(((p, 258 + k) for k, p in enumerate(ByteTokenizer.MERGES)), key=lambda x: -len(x[0]))
    while i < len(raw):
        for piece, tid in pieces:
            if raw.startswith(piece, i):
                ids.append(tid)
                i += len(piece)
                break
        else:
            ids.append(raw[i])
            i += 1
    return ids


def stream(ids: list[int], stop: tuple[str, ...] = (), prompt: list[int] | None = None) -> tuple[list[str], str, bool]:
    d = Detokenizer(TOK, prompt or [ord(">")], SamplingParams(stop=stop))
    deltas = []
    for t in ids:
        deltas.append(d.add_token(t))
        if d.stopped:
            break
    deltas.append(d.finish())
    return deltas, d.text, d.stopped


def test_multibyte_characters_stream_whole():
    for ids in (byte_ids(TEXT), with_merges("日本 the é" + TEXT)):
        deltas, text, _ = stream(ids)
        assert "".join(deltas) == text == TOK.decode(ids)
        assert not any("\ufffd" in d for d in deltas)
    # a 4-byte emoji yields nothing until its last byte
    deltas, _, _ = stream(byte_ids("🦙"))
    assert deltas[:4] == ["", "", "", "🦙"]


def test_merge_tokens_ending_mid_character():
    ids = with_merges("日本")
    assert ids == [258 + 2, 258 + 3, "日本".encode()[5]]  # 2 bytes | 1 + 2 bytes | 1 byte
    deltas, text, _ = stream(ids)
    assert text == "日本" and "\ufffd" not in "".join(deltas)


def test_truncated_character_is_flushed_on_finish():
    ids = byte_ids("ok") + list("é".encode()[:1])
    deltas, text, _ = stream(ids)
    assert deltas[:2] == ["o", "k"] and deltas[2] == "" and text == "ok\ufffd"


def test_prompt_ending_mid_character_does_not_corrupt_output():
    deltas, text, _ = stream(byte_ids("xy"), prompt=list("é".encode()[:1]))
    assert "".join(deltas) == text == "xy"


def test_special_tokens_skipped_or_shown():
    d = Detokenizer(TOK, [1], SamplingParams(skip_special_tokens=False))
    assert d.add_token(257) == "<bos>"
    d2 = Detokenizer(TOK, [1], SamplingParams())
    assert d2.add_token(257) == "" and d2.add_token(ord("a")) == "a"


def test_stop_string_across_tokens_never_streamed():
    ids = byte_ids("hello wor") + byte_ids("ld, STOP") + byte_ids("P here")
    deltas, text, stopped = stream(ids, stop=("STOPP",))
    assert stopped and text == "hello world, " and "".join(deltas) == text
    for d in deltas:
        assert not any(ch in d for ch in "STOP")


def test_partial_stop_prefix_is_released_when_it_diverges():
    ids = byte_ids("a STO, then STOP!")
    d = Detokenizer(TOK, [1], SamplingParams(stop=("STOP!",)))
    seen = ""
    for t in ids:
        seen += d.add_token(t)
        if seen.endswith("ST"):
            raise AssertionError("a possible stop prefix was streamed")
        if d.stopped:
            break
    seen += d.finish()
    assert d.stopped and seen == "a STO, then "


def test_earliest_stop_string_wins_and_multiple_stops():
    deltas, text, _ = stream(byte_ids("xx END yy STOP"), stop=("STOP", "END"))
    assert text == "xx "
    deltas, text, _ = stream(byte_ids("abcabd"), stop=("abd", "bc"))
    assert text == "a"


def test_a_kept_stop_string_ends_the_text():
    """include_stop_str_in_output: the text ends right after the stop string that ended it, never after a longer one
    that would have completed later."""
    for text, stop, expected in [("xx END yy STOP", ("STOP", "END"), "xx END"), ("abcabd", ("abd", "bc"), "abc"),
                                 ("say ab then abc", ("abc", "ab"), "say ab")]:
        d = Detokenizer(TOK, [ord(">")], SamplingParams(stop=stop, include_stop_str_in_output=True))
        deltas = [d.add_token(t) for t in byte_ids(text)[:len(expected)]]
        assert d.stopped and d.text == expected == "".join(deltas) + d.finish(), (text, stop)


def test_a_delta_of_several_characters_stops_at_the_stop_string_completed_first():
    m = StopStringMatcher(["abcd", "bc"])
    assert m.feed("xabcd") == "xa" and m.stopped  # "bc" is complete before "abcd" is
    kept = StopStringMatcher(["abcd", "bc"], include=True)
    assert kept.feed("xabcd") == "xabc" and kept.text == "xabc"


def test_stop_string_inside_a_multibyte_char_sequence():
    deltas, text, stopped = stream(byte_ids("café日本語"), stop=("日本",))
    assert stopped and text == "café" and "".join(deltas) == "café"


def test_held_back_text_is_flushed_at_finish_without_stop():
    deltas, text, stopped = stream(byte_ids("the end ST"), stop=("STOP",))
    assert not stopped and text == "the end ST" and deltas[-1] == "ST"


def test_matcher_holds_only_possible_prefixes():
    m = StopStringMatcher(["xyz"])
    assert m.feed("abcx") == "abc"  # "x" might start "xyz"
    assert m.feed("q") == "xq"
    assert m.feed("xy") == ""
    assert m.feed("z tail") == "" and m.stopped and m.text == "abcxq"


def test_decoder_window_stays_small():
    dec = IncrementalDecoder(TOK, [], True)
    for t in byte_ids("x" * 1000):
        dec.add(t)
    assert len(dec._ids) <= 2


@settings(max_examples=60, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list("ab STOP日本é🦙\n")), max_size=40),
       stop=st.lists(st.text(alphabet=st.sampled_from(list("abSTOP日é")), min_size=1, max_size=4), max_size=3))
def test_streaming_equals_offline_truncation(text, stop):
    """Streamed text == the text cut where generation stops: at the first character by which some stop
    string has been completed (of those completed there, cut before the one starting earliest).
    No delta ever shows a stop string."""
    deltas, out, stopped = stream(byte_ids(text), stop=tuple(stop))
    expected, expect_stop = text, False
    for end in range(1, len(text) + 1):
        starts = [end - len(s) for s in stop if text[:end].endswith(s)]
        if starts:
            expected, expect_stop = text[: min(starts)], True
            break
    assert "".join(deltas) == out == expected and stopped == expect_stop
    assert not any("\ufffd" in d for d in deltas)


def test_engine_stop_string_and_min_tokens():
    ids = byte_ids("ab##cd##ef")
    runner = ScriptedRunner({"r": ids, "m": ids}, num_blocks=64, block_size=4)
    engine = make_engine(runner=runner)
    engine.add_request(RequestSpec("r", [1, 2], SamplingParams(max_tokens=20, temperature=0, stop=("##",))))
    # min_tokens=4: the first "##" completes at token 4, so it still counts; use 5 to skip it
    engine.add_request(RequestSpec("m", [1, 2], SamplingParams(max_tokens=20, temperature=0, stop=("##",), min_tokens=5)))
    streamed: dict[str, str] = {"r": "", "m": ""}
    finals = {}
    while engine.has_unfinished():
        for o in engine.step():
            assert o.request_id == "m" or "#" not in o.new_text
            streamed[o.request_id] += o.new_text
            if o.finished:
                finals[o.request_id] = o.final
    assert finals["r"].finish_reason is FinishReason.STOP and finals["r"].text == streamed["r"] == "ab"
    assert list(finals["r"].token_ids) == ids[:4]
    # the first "##" completes at token 4, within min_tokens=5: it is plain text; the second stops
    assert finals["m"].finish_reason is FinishReason.STOP and finals["m"].text == streamed["m"] == "ab##cd"
