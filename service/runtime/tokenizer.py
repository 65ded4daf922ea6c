"""Text <-> token ids and chat prompt rendering for the served model.

Built on HF `tokenizers` so the BPE itself is the same Rust code the model's own tokenizer runs.
Two sources: a GGUF file (vocab, merges and flags in llama.cpp's metadata keys) or a HF model
directory (`tokenizer.json` + `tokenizer_config.json`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

import gguf
import jinja2
import jinja2.ext
import jinja2.meta
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

log = logging.getLogger(__name__)

CHAT_ROLES = ("system", "user", "assistant", "tool")
SUPPORTED_GGUF_TOKENIZERS = ("gpt2", "llama")

# llama.cpp token_type values (gguf.TokenType); only these two change how text is split.
_CONTROL, _USER_DEFINED = 3, 4

# Tokens that end a turn in common chat templates. Instruct models emit these rather than (or as well
# as) the vocabulary's EOS, so generation must stop on them too or answers run into a new turn.
_END_MARKERS = "<|im_end|> <|eot_id|> <|eom_id|> <|end_of_text|> <|endoftext|> <|end|> <end_of_turn>".split()


def _tiktoken_style_split(digits: str) -> str:
    """The pre-tokenizer regex of Llama 3 / Qwen2 (they differ only in how many digits stay together)."""
    return "|".join(
        (
            r"(?i:'s|'t|'re|'ve|'m|'ll|'d)",  # English contractions, any case
            r"[^\r\n\p{L}\p{N}]?\p{L}+",  # a word with at most one leading non-letter, usually its space
            r"\p{N}" + digits,
            r" ?[^\s\p{L}\p{N}]+[\r\n]*",  # a punctuation run keeps its trailing newlines
            r"\s*[\r\n]+",
            r"\s+(?!\S)",  # spaces before a word leave the last one to that word
            r"\s+",
        )
    )


# Byte-level spelling without any splitting of its own: for after a Split, and to respell tokens.
_BYTES_ONLY = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
_BYTE_ALPHABET = frozenset(pre_tokenizers.ByteLevel.alphabet())
_LLAMA3_SPLIT = _tiktoken_style_split("{1,3}")
_QWEN2_SPLIT = _tiktoken_style_split("")

# tokenizer.ggml.pre -> family. Aliases are the names llama.cpp's converter writes for the same regex.
_PRE_FAMILIES = {
    **dict.fromkeys(("default", "gpt2"), "gpt2"),
    "smollm": "smollm",
    **dict.fromkeys(("llama-bpe", "llama3", "llama-v3"), "llama3"),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), "qwen2"),
}


def _byte_level_pre(pre: str) -> tuple[pre_tokenizers.PreTokenizer, normalizers.Normalizer | None]:
    family = _PRE_FAMILIES.get(pre)
    if family is None:
        # Wrong splitting degrades quality but still round-trips, so warn rather than refuse the model.
        log.warning(
            "unknown tokenizer.ggml.pre %r: splitting as GPT-2; known: %s", pre, sorted(_PRE_FAMILIES)
        )
    gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if family in ("llama3", "qwen2"):
        regex = Regex(_LLAMA3_SPLIT if family == "llama3" else _QWEN2_SPLIT)
        steps = [pre_tokenizers.Split(regex, behavior="isolated"), _BYTES_ONLY]
    elif family == "smollm":  # SmolLM2's own tokenizer.json: every digit alone, then GPT-2 splitting
        steps = [pre_tokenizers.Digits(individual_digits=True), gpt2]
    else:
        steps = [gpt2]
    # Qwen2's reference tokenizer NFC-normalizes before splitting; the others do not normalize.
    return pre_tokenizers.Sequence(steps), (normalizers.NFC() if family == "qwen2" else None)


def _merges_from_scores(
    tokens: Sequence[str], scores: Sequence[float], ids: Mapping[str, int]
) -> list[tuple[str, str]]:
    """Recover BPE merges from a SentencePiece vocabulary that stores only scores.

    SentencePiece BPE merges the adjacent pair whose concatenation has the best score, so every way
    to cut a token into two vocabulary pieces becomes a merge ranked by that token's score. Ties are
    ordered as transformers orders them (longer left piece, then longer right, then id order) so the
    two agree on the same file.
    """
    ranked: list[tuple[float, str, str]] = []
    for piece, score in dict(zip(tokens, scores, strict=True)).items():
        cuts = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in ids and piece[k:] in ids]
        cuts.sort(key=lambda cut: (ids[cut[0]], ids[cut[1]]))
        ranked.extend((score, left, right) for left, right in cuts)
    ranked.sort(key=lambda m: (-m[0], -len(m[1]), -len(m[2])))  # stable: equal keys keep the order above
    return [(left, right) for _, left, right in ranked]


# Appended to the content of a message the answer goes on from (continue_final_message): where the text is cut.
_CONTINUE_MARK = "\u2063<<loraserve:continue>>\u2063"


def _raise_exception(message: str) -> NoReturn:
    raise jinja2.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(value: Any, ensure_ascii: bool = False, **kwargs: Any) -> str:
    # Jinja's own tojson HTML-escapes <, >, & and '; templates expect plain JSON as transformers renders it.
    return json.dumps(value, ensure_ascii=ensure_ascii, **kwargs)


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; render just the body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> list[jinja2.nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _compile_template(source: str) -> tuple[jinja2.Template, bool]:
    """The template, and whether it renders a request's tools (reads a `tools` variable)."""
    # The same environment shape transformers renders with, so templates written for it behave the same.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _GenerationTag]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        ast = env.parse(source)
        return env.from_string(ast), "tools" in jinja2.meta.find_undeclared_variables(ast)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"the chat template does not compile (line {e.lineno}): {e.message}") from e


def _validate_messages(messages: Any) -> None:
    if not isinstance(messages, list):
        raise ValueError(
            f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}"
        )
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(
                f"message {i} must be a dict with 'role' and 'content', got {type(message).__name__}"
            )
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise ValueError(f"message {i} has role {role!r}; allowed roles: {', '.join(CHAT_ROLES)}")
        if not isinstance(message.get("content"), str):
            raise ValueError(
                f"message {i} (role {role!r}) must have string 'content', got {type(message.get('content')).__name__}"
            )


class Tokenizer:
    """A model's tokenizer: encode/decode plus its chat template. Build with `from_gguf` or `from_dir`."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        add_bos_token: bool = False,
        add_eos_token: bool = False,
        chat_template: str | None = None,
        extra_eos_ids: Iterable[int] = (),
        vocab_size: int | None = None,
    ) -> None:
        self._backend = backend
        self._bos_token, self._eos_token = bos_token, eos_token
        self._bos_id = backend.token_to_id(bos_token) if bos_token is not None else None
        self._eos_id = backend.token_to_id(eos_token) if eos_token is not None else None
        # As transformers does, a flag naming a token the vocabulary lacks is dropped rather than fatal.
        self._add_bos = add_bos_token and self._bos_id is not None
        self._add_eos = add_eos_token and self._eos_id is not None
        self._vocab_size = (
            vocab_size if vocab_size is not None else backend.get_vocab_size(with_added_tokens=True)
        )
        specials = {t.content: i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        eos = {i for i in (self._eos_id, *extra_eos_ids) if i is not None}
        eos.update(specials[m] for m in _END_MARKERS if m in specials)
        self._eos_ids = frozenset(eos)
        self._template, self._takes_tools = _compile_template(chat_template) if chat_template else (None, False)
        self.chat_template = chat_template or ""  # the template's source

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, path_or_reader: str | os.PathLike[str] | gguf.GGUFReader) -> Tokenizer:
        reader = path_or_reader
        if not isinstance(reader, gguf.GGUFReader):
            reader = gguf.GGUFReader(reader)

        def field(key: str, default: Any = None) -> Any:
            f = reader.fields.get(key)
            return default if f is None else f.contents()

        kind = field("tokenizer.ggml.model")
        if kind not in SUPPORTED_GGUF_TOKENIZERS:
            raise ValueError(
                f"GGUF tokenizer model {kind!r} (tokenizer.ggml.model) is not supported; "
                f"supported: {', '.join(SUPPORTED_GGUF_TOKENIZERS)} (byte-level BPE and SentencePiece BPE)"
            )
        tokens: list[str] | None = field("tokenizer.ggml.tokens")
        if not tokens:
            raise ValueError("GGUF file has no tokenizer.ggml.tokens: it carries no vocabulary")
        types: list[int] = field("tokenizer.ggml.token_type") or [1] * len(tokens)
        if len(types) != len(tokens):
            raise ValueError(f"GGUF has {len(tokens)} tokens but {len(types)} token types")

        def token_at(key: str) -> str | None:
            i = field(key)
            return tokens[i] if i is not None and 0 <= i < len(tokens) else None

        is_spm = kind == "llama"
        # Control and user-defined tokens are matched as raw text (llama.cpp does the same), so their
        # vocab key is their text; ordinary byte-level tokens must be spelled in the byte alphabet.
        vocab: dict[str, int] = {}
        added: list[AddedToken] = []
        for i, (tok, typ) in enumerate(zip(tokens, types, strict=True)):
            if typ in (_CONTROL, _USER_DEFINED):
                # Only control tokens are special: user-defined ones (e.g. `<think>`) stay in decoded text.
                added.append(AddedToken(tok, special=typ == _CONTROL, normalized=False))
            key = tok if is_spm or typ in (_CONTROL, _USER_DEFINED) else _byte_level_spelling(tok)
            vocab.setdefault(key, i)  # a duplicate keeps its first id, so no id moves
        merges_field: list[str] | None = field("tokenizer.ggml.merges")
        if merges_field:
            merges = [tuple(m.split(" ", 1)) for m in merges_field]
        elif is_spm:
            merges = _merges_from_scores(tokens, field("tokenizer.ggml.scores") or [0.0] * len(tokens), vocab)
        else:
            raise ValueError("GGUF byte-level (gpt2) tokenizer has no tokenizer.ggml.merges")

        pre = field("tokenizer.ggml.pre", "default")
        if is_spm:
            unk = token_at("tokenizer.ggml.unknown_token_id")
            backend = tokenizers.Tokenizer(
                models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True)
            )
            # SentencePiece marks word starts with U+2581 and, by default, prefixes the text with one.
            prefix = bool(field("tokenizer.ggml.add_space_prefix", True))
            backend.pre_tokenizer = pre_tokenizers.Metaspace(
                replacement="\u2581", prepend_scheme="first" if prefix else "never", split=False
            )
            steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
            backend.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
        else:
            family = _PRE_FAMILIES.get(pre)
            # Llama 3's vocabulary comes from tiktoken, which takes a whole pre-token from the vocabulary
            # before trying merges; its reference tokenizer.json and llama.cpp both do this.
            backend = tokenizers.Tokenizer(models.BPE(vocab, merges, ignore_merges=family == "llama3"))
            backend.pre_tokenizer, backend.normalizer = _byte_level_pre(pre)
            backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens([t for t in added if t.special])
        backend.add_tokens([t for t in added if not t.special])
        extra_eos = [field(k) for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")]
        return cls(
            backend,
            bos_token=token_at("tokenizer.ggml.bos_token_id"),
            eos_token=token_at("tokenizer.ggml.eos_token_id"),
            # Without the flag, follow the reference tokenizers: Llama 2 (SentencePiece) and Llama 3 start
            # with BOS, GPT-2-style vocabularies do not.
            add_bos_token=bool(
                field("tokenizer.ggml.add_bos_token", is_spm or _PRE_FAMILIES.get(pre) == "llama3")
            ),
            add_eos_token=bool(field("tokenizer.ggml.add_eos_token", False)),
            chat_template=field("tokenizer.chat_template"),
            extra_eos_ids=[i for i in extra_eos if i is not None],
            vocab_size=len(tokens),
        )

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> Tokenizer:
        root = Path(path)
        if not (root / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{root} has no tokenizer.json")
        backend = tokenizers.Tokenizer.from_file(str(root / "tokenizer.json"))
        config = _read_json(root / "tokenizer_config.json")
        generation = _read_json(root / "generation_config.json")

        template = _pick_template(config.get("chat_template"))
        # Newer repos keep the template in its own file, which transformers prefers over the config's.
        if (root / "chat_template.jinja").is_file():
            template = (root / "chat_template.jinja").read_text(encoding="utf-8")
        if "add_bos_token" in config or "add_eos_token" in config:
            # As in transformers, explicit flags replace whatever BOS/EOS the tokenizer.json post-processor adds.
            backend.post_processor = None
        gen_eos = generation.get("eos_token_id")
        extra_eos = gen_eos if isinstance(gen_eos, list) else [gen_eos] if isinstance(gen_eos, int) else []
        return cls(
            backend,
            bos_token=_token_content(config.get("bos_token")),
            eos_token=_token_content(config.get("eos_token")),
            add_bos_token=bool(config.get("add_bos_token", False)),
            add_eos_token=bool(config.get("add_eos_token", False)),
            chat_template=template,
            extra_eos_ids=[int(i) for i in extra_eos],
        )

    # -- encode / decode ------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The HF `tokenizers` object underneath (read it; changing it changes this tokenizer)."""
        return self._backend

    @property
    def bos_token_id(self) -> int | None:
        return self._bos_id

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """Ids that end generation: the EOS token and any end-of-turn marker the vocabulary has."""
        return self._eos_ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        # encode_batch, not encode: the `tokenizers` bindings hold the GIL through `encode` but release it
        # around `encode_batch`. Held, a long prompt stops the engine loop's thread for the whole encode
        # (1.2 MB: 0.48 s with no other thread running); released, the loop runs beside it. ~1 us dearer.
        ids = self._backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        if add_special_tokens:
            if self._add_bos:
                ids.insert(0, self._bos_id)
            if self._add_eos:
                ids.append(self._eos_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # -- chat -----------------------------------------------------------------------------------

    @property
    def has_chat_template(self) -> bool:
        return self._template is not None

    @property
    def template_takes_tools(self) -> bool:
        """The chat template renders a request's tools itself (it reads a `tools` variable)."""
        return self._takes_tools

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None, continue_final_message: bool = False) -> str:
        """`tools`: OpenAI's tool objects (`{"type": "function", "function": {...}}`), handed to a template that
        takes them (`template_takes_tools`); None renders as transformers does without tools.
        `continue_final_message`: the text ends with the last message's content, its turn left open (what comes
        after it, the end of the turn, is cut), for the model to go on from; no generation prompt then."""
        if self._template is None:
            raise ValueError("this model has no chat template: send a raw prompt instead of chat messages")
        _validate_messages(messages)
        if continue_final_message:
            # The text is cut where the last message's content ends: marked, so the cut cannot land on the same
            # words elsewhere (an earlier turn, the template's own markers).
            if not messages or _CONTINUE_MARK in messages[-1]["content"]:
                raise ValueError("continue_final_message needs a last message to go on from")
            messages = [*messages[:-1], {**messages[-1], "content": messages[-1]["content"] + _CONTINUE_MARK}]
        try:
            text = self._template.render(
                messages=messages,
                tools=tools,
                bos_token=self._bos_token or "",
                eos_token=self._eos_token or "",
                add_generation_prompt=add_generation_prompt and not continue_final_message,
            )
        except jinja2.TemplateError as e:  # includes the template's own raise_exception(...)
            raise ValueError(f"the chat template rejected the messages: {e}") from e
        if not continue_final_message:
            return text
        i = text.find(_CONTINUE_MARK)
        if i < 0 or text.find(_CONTINUE_MARK, i + 1) >= 0:
            raise ValueError("the chat template does not write the last message's text as it is, so the answer "
                             "cannot go on from it")
        return text[:i]

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    tools: list[dict] | None = None, continue_final_message: bool = False) -> list[int]:
        # The rendered text already holds BOS/turn markers as text, so adding BOS here would double it.
        text = self.apply_chat_template(messages, add_generation_prompt, tools, continue_final_message)
        return self.encode(text, add_special_tokens=False)


def _byte_level_spelling(token: str) -> str:
    """A token in the GPT-2 byte alphabet. Files store them so; respell the odd one stored as raw text."""
    if set(token) <= _BYTE_ALPHABET:
        return token
    return "".join(piece for piece, _ in _BYTES_ONLY.pre_tokenize_str(token))


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with path.open(encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


def _pick_template(value: Any) -> str | None:
    """`chat_template` is a string, or a list of {"name", "template"} of which "default" is the chat one."""
    if value is None or isinstance(value, str):
        return value or None
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        # Other names (tool_use, rag) expect variables we do not pass, so they are only a fallback.
        return named.get("default") or next(iter(named.values()), None)
    raise ValueError(
        f"chat_template must be a string or a list of named templates, got {type(value).__name__}"
    )


def _token_content(value: Any) -> str | None:
    """bos_token / eos_token in tokenizer_config.json: a string, or a serialized AddedToken dict."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"special token must be a string or a dict with 'content', got {value!r}")
