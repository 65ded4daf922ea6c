"""Parse a PEFT `adapter_config.json` into our normalized, torch-free LoRA description.

peft resolves a LoRA config against the *module names* of the base model (`model.named_modules()`),
e.g. `model.layers.3.self_attn.q_proj`. We have no transformers model at serving time, so we rebuild the
Llama-family module names from the base model's shapes (`BaseShapes`) and apply peft's own matching rules to them:

- `target_modules` list: a name matches when it equals an entry or ends with `"." + entry`
  (peft `check_target_module_exists`); a str is a regex that must `re.fullmatch` the name;
  `"all-linear"` means every linear layer except the output head (peft `_maybe_include_all_linear_layers`).
- `layers_to_transform` / `layers_pattern` only apply to list targets (peft refuses them with a regex).
- `exclude_modules`: str -> fullmatch, list -> equal or `"." + entry` suffix.
- `rank_pattern` / `alpha_pattern`: the first key (in file order) with `re.match(rf"(.*\\.)?({key})$", name)`
  wins (peft `get_pattern_key`); otherwise `r` / `lora_alpha`.
- scale = alpha / r, or alpha / sqrt(r) with `use_rslora` (peft `LoraLayer.update_layer`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol

try:  # the stdlib regex parser, to bound the cost of regexes from uploaded configs
    from re import _parser as _sre_parse  # Python >= 3.11
except ImportError:  # pragma: no cover - Python 3.10
    import sre_parse as _sre_parse  # type: ignore[no-redef]



class BaseShapes(Protocol):
    """What an adapter is validated against: the base model's layer count, hidden size and projection
    shapes. `service.runtime.arch.ModelArch` is one; adapters/ needs nothing else of the model."""

    @property
    def num_layers(self) -> int: ...

    @property
    def hidden_size(self) -> int: ...

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(out_features, in_features) of each per-layer projection, by HF module name."""
        ...


# The only modules we can serve a LoRA delta on: projection name -> its parent inside a decoder layer.
PROJECTIONS: dict[str, str] = {
    "q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
    "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp",
}
DEFAULT_MAX_RANK = 128
ALL_LINEAR = "all-linear"
_EMBEDDING_MODULES = ("embed_tokens", "lm_head")
# Bounds on regexes from configs (see `_compile`): matching them against every module name stays ~1 s worst.
_MAX_REGEX_CHARS = 512
_MAX_CHOICES = 5
_MAX_CHOICES_PER_KEY = 3
_KEY_PREFIX_CHOICES = 2  # peft wraps a pattern key as `(.*\.)?(key)$`: the `?` and the `.*`
_PATTERN_KEYS_CHOICE_BUDGET = 32
_MAX_PATTERN_KEYS = 4096  # also caps list entries (target/exclude modules)
_REPEAT_OPS = tuple(getattr(_sre_parse, op) for op in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT")
                    if hasattr(_sre_parse, op))

# Config keys that change what the adapter computes (or need weights we do not serve): any non-empty value
# is refused with the feature's name. Everything else peft writes (dropout, init configs of methods that
# leave the base untouched, task_type, revision, ...) has no effect at inference and is ignored.
_UNSUPPORTED_FEATURES: dict[str, str] = {
    "use_dora": "DoRA (use_dora)",
    "modules_to_save": "modules_to_save (fully trained extra modules)",
    "layer_replication": "layer_replication",
    "use_qalora": "QA-LoRA (use_qalora)",
    "megatron_config": "megatron_config (Megatron-parallel LoRA)",
    "lora_bias": "lora_bias (a bias on lora_B)",
    "target_parameters": "target_parameters (LoRA on raw nn.Parameters)",
    "trainable_token_indices": "trainable_token_indices (trained embedding rows)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "arrow_config": "Arrow routing (arrow_config)",
    "velora_config": "VeLoRA (velora_config)",
    "kasa_config": "KaSA (kasa_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
}
# Initialisations that rewrite the *base* weights (W_res = W - scale * B @ A, or a LoftQ-quantized W): the
# adapter is only correct on that residual base, which we cannot have while the base is shared. peft's
# `save_pretrained(path_initial_model_for_weight_conversion=...)` converts them into plain LoRA.
_BASE_MUTATING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


class AdapterError(ValueError):
    """An adapter we refuse; the message names the offending feature, key, file or tensor."""


@dataclass(frozen=True)
class ModuleLora:
    """The LoRA applied to one projection of one layer: delta = scale * (x @ A.T) @ B.T."""

    rank: int
    alpha: float
    scale: float


@dataclass(frozen=True)
class LoraAdapterConfig:
    """A PEFT LoRA config resolved against one base model: every targeted (layer, projection)."""

    modules: Mapping[tuple[int, str], ModuleLora]
    use_rslora: bool
    fan_in_fan_out: bool = False  # peft forces it off for nn.Linear; weights are [r, in] / [out, r] anyway
    base_model_name_or_path: str | None = field(default=None, compare=False)  # informational only

    @property
    def target_modules(self) -> frozenset[str]:
        return frozenset(name for _, name in self.modules)

    @property
    def max_rank(self) -> int:
        return max(m.rank for m in self.modules.values())

    def canonical(self) -> dict[str, Any]:
        """What the adapter computes, independent of how the config was written (for content ids)."""
        return {
            "format": "peft-lora/1",
            "modules": [
                {"layer": layer, "module": name, "rank": m.rank, "scale": m.scale}
                for (layer, name), m in sorted(self.modules.items())
            ],
        }


def module_name(layer: int, proj: str) -> str:
    """peft's key for a projection in the base model, e.g. `model.layers.3.self_attn.q_proj`."""
    return f"model.layers.{layer}.{PROJECTIONS[proj]}.{proj}"


def llama_module_names(num_layers: int) -> list[str]:
    """Every `named_modules()` name of a transformers Llama-family CausalLM, so that targets matching a
    norm, a whole MLP or the embeddings are caught instead of silently skipped."""
    names = ["model", "model.embed_tokens", "model.layers", "model.norm", "model.rotary_emb", "lm_head"]
    for i in range(num_layers):
        p = f"model.layers.{i}"
        names += [p, f"{p}.self_attn", f"{p}.mlp", f"{p}.mlp.act_fn", f"{p}.input_layernorm",
                  f"{p}.post_attention_layernorm"]
        names += [module_name(i, proj) for proj in PROJECTIONS]
    return names


def parse_lora_config(
    raw: bytes | str | Mapping[str, Any], arch: BaseShapes, *, max_rank: int = DEFAULT_MAX_RANK
) -> LoraAdapterConfig:
    """Validate an `adapter_config.json` and resolve it against `arch`; raise AdapterError if refused."""
    cfg = _load_json(raw)
    peft_type = cfg.get("peft_type")
    if peft_type != "LORA":
        raise AdapterError(f"adapter_config.json: peft_type {peft_type!r} is not supported; only LORA adapters are")
    for key, feature in _UNSUPPORTED_FEATURES.items():
        if cfg.get(key):
            raise AdapterError(f"adapter_config.json: {feature} is not supported (got {key}={cfg[key]!r})")
    if cfg.get("bias") not in (None, "none"):
        raise AdapterError(f"adapter_config.json: bias={cfg['bias']!r} is not supported; only bias='none' is")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_MUTATING_INITS):
        raise AdapterError(
            f"adapter_config.json: init_lora_weights={init!r} adapters need rewritten base weights; convert it "
            "to plain LoRA with peft's save_pretrained(path_initial_model_for_weight_conversion=...)"
        )

    r = _typed(cfg, "r", int)
    alpha = _typed(cfg, "lora_alpha", (int, float), default=8)
    use_rslora = _typed(cfg, "use_rslora", bool, default=False)
    fan_in_fan_out = _typed(cfg, "fan_in_fan_out", bool, default=False)
    rank_pattern = _pattern(cfg, "rank_pattern", int)
    alpha_pattern = _pattern(cfg, "alpha_pattern", (int, float))
    base_name = cfg.get("base_model_name_or_path")

    names = llama_module_names(arch.num_layers)
    targeted = _resolve_targets(cfg, names)
    modules: dict[tuple[int, str], ModuleLora] = {}
    for layer in range(arch.num_layers):
        for proj in PROJECTIONS:
            key = module_name(layer, proj)
            if key not in targeted:
                continue
            rank = _pattern_value(rank_pattern, key, r)
            a = _pattern_value(alpha_pattern, key, alpha)
            if rank <= 0:
                raise AdapterError(f"adapter_config.json: rank {rank} for {key}; the rank must be at least 1")
            if rank > max_rank:
                raise AdapterError(f"adapter_config.json: rank {rank} for {key} exceeds max_rank {max_rank}")
            if not math.isfinite(a):
                raise AdapterError(f"adapter_config.json: lora_alpha {a!r} for {key} is not finite")
            scale = a / math.sqrt(rank) if use_rslora else a / rank
            modules[(layer, proj)] = ModuleLora(rank=rank, alpha=float(a), scale=scale)
    return LoraAdapterConfig(
        modules=MappingProxyType(modules), use_rslora=use_rslora, fan_in_fan_out=fan_in_fan_out,
        base_model_name_or_path=base_name if isinstance(base_name, str) else None,
    )


def _load_json(raw: bytes | str | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(raw, Mapping):
        return dict(raw)
    try:
        cfg = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise AdapterError(f"adapter_config.json is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise AdapterError("adapter_config.json must hold a JSON object")
    return cfg


def _typed(cfg: Mapping[str, Any], key: str, types: type | tuple[type, ...], default: Any = ...) -> Any:
    """cfg[key] checked against `types`; bools are not numbers here (JSON `true` is not a rank)."""
    if key not in cfg or (cfg[key] is None and default is not ...):
        if default is ...:
            raise AdapterError(f"adapter_config.json: required key {key!r} is missing")
        return default
    value = cfg[key]
    numeric = types is not bool and isinstance(value, bool)
    if numeric or not isinstance(value, types):
        expected = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise AdapterError(f"adapter_config.json: key {key!r} must be {expected}, got {value!r}")
    return value


def _pattern(
    cfg: Mapping[str, Any], key: str, types: type | tuple[type, ...]
) -> list[tuple[re.Pattern[str], Any]]:
    """(compiled peft key regex, value) in file order: peft takes the first key that matches."""
    patterns = _typed(cfg, key, dict, default={})
    if len(patterns) > _MAX_PATTERN_KEYS:
        raise AdapterError(f"adapter_config.json: {key} has {len(patterns)} keys, more than {_MAX_PATTERN_KEYS}")
    out, budget = [], _PATTERN_KEYS_CHOICE_BUDGET
    for k, v in patterns.items():
        if isinstance(v, bool) or not isinstance(v, types):
            raise AdapterError(f"adapter_config.json: {key}[{k!r}] must be a number, got {v!r}")
        # peft `get_pattern_key`: the key matches a dot-separated suffix of the module name.
        regex, choices = _compile(f"{key}[{k!r}]", rf"(.*\.)?({k})$", _MAX_CHOICES_PER_KEY, _KEY_PREFIX_CHOICES)
        budget -= choices
        if budget < 0:
            raise AdapterError(f"adapter_config.json: the keys of {key} are too complex regular expressions "
                               f"(more than {_PATTERN_KEYS_CHOICE_BUDGET} repetitions or alternations in all)")
        out.append((regex, v))
    return out


def _pattern_value(patterns: list[tuple[re.Pattern[str], Any]], name: str, default: Any) -> Any:
    return next((v for regex, v in patterns if regex.match(name)), default)


def _compile(
    where: str, pattern: str, max_choices: int = _MAX_CHOICES, wrapper_choices: int = 0
) -> tuple[re.Pattern[str], int]:
    """Compile a regex from the (untrusted, uploaded) config with bounded matching cost.

    Python's `re` backtracks and holds the GIL: `(.*)*x` against a 32-character module name runs for hours
    and would freeze the server. Names are short, so the cost is bounded when no repetition or alternation
    sits inside a repetition and there are at most `max_choices` of them (5 `.*` over ~400 names: ~1 s).
    `wrapper_choices` are those of peft's own wrapping around the user's text. Returns the regex and the
    number of choice points of the user's text.
    """
    if len(pattern) > _MAX_REGEX_CHARS:
        raise AdapterError(f"adapter_config.json: {where} is longer than {_MAX_REGEX_CHARS} characters")
    try:
        choices = _choice_points(_sre_parse.parse(pattern), inside_repeat=False, where=where) - wrapper_choices
        regex = re.compile(pattern)
    except re.error as e:
        raise AdapterError(f"adapter_config.json: {where} is not a valid regular expression: {e}") from None
    if choices > max_choices:
        raise AdapterError(f"adapter_config.json: {where} has {choices} repetitions/alternations; at most "
                           f"{max_choices} are allowed (bounded regex matching cost)")
    return regex, choices


def _choice_points(sub: Any, *, inside_repeat: bool, where: str) -> int:
    """Repetitions and alternations in a parsed regex; refuse them nested in a repetition (exponential)."""
    n = 0
    for op, av in sub:
        is_repeat = op in _REPEAT_OPS
        if (is_repeat or op is _sre_parse.BRANCH) and inside_repeat:
            raise AdapterError(f"adapter_config.json: {where} nests a repetition or alternation inside a "
                               "repetition, which can take exponential time to match")
        if is_repeat:
            lo, hi, body = av
            n += lo != hi
            n += _choice_points(body, inside_repeat=hi > 1, where=where)
            continue
        n += op is _sre_parse.BRANCH
        stack = [av]
        while stack:  # operands nest SubPatterns inside tuples/lists (groups, branches, lookarounds)
            item = stack.pop()
            if isinstance(item, _sre_parse.SubPattern):
                n += _choice_points(item, inside_repeat=inside_repeat, where=where)
            elif isinstance(item, (list, tuple)):
                stack.extend(item)
    return n


def _names_list(cfg: Mapping[str, Any], key: str) -> list[str] | str | None:
    value = cfg.get(key)
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) and v for v in value):
        if len(value) > _MAX_PATTERN_KEYS:
            raise AdapterError(f"adapter_config.json: {key} has {len(value)} entries, more than {_MAX_PATTERN_KEYS}")
        return value
    raise AdapterError(f"adapter_config.json: key {key!r} must be a string or a list of names, got {value!r}")


def _list_match(entries: list[str], name: str) -> bool:
    return name in entries or any(name.endswith("." + e) for e in entries)


def _resolve_targets(cfg: Mapping[str, Any], names: list[str]) -> set[str]:
    """The module names peft would wrap with LoRA; refuse any that is not one of our projections."""
    targets = _names_list(cfg, "target_modules")
    if targets is None or targets == []:
        raise AdapterError("adapter_config.json: required key 'target_modules' is missing or empty")
    layers = cfg.get("layers_to_transform")
    if layers is not None and not (
        (isinstance(layers, int) and not isinstance(layers, bool))
        or (isinstance(layers, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in layers))
    ):
        raise AdapterError(
            f"adapter_config.json: key 'layers_to_transform' must be an int or a list of ints, got {layers!r}"
        )
    layers_pattern = _names_list(cfg, "layers_pattern")
    for p in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern or []:
        _compile("layers_pattern", rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.")
    exclude = _names_list(cfg, "exclude_modules")

    if isinstance(targets, str) and (layers is not None or layers_pattern is not None):
        raise AdapterError("adapter_config.json: layers_to_transform/layers_pattern cannot be used when "
                           "target_modules is a string (peft's LoraConfig refuses this too)")
    regex: re.Pattern[str] | None = None
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        # Every nn.Linear but the output head (peft `_maybe_include_all_linear_layers`).
        targets = list(PROJECTIONS)
    elif isinstance(targets, str):
        regex = _compile("target_modules", targets)[0]
    else:
        for entry in targets:
            if not any(_list_match([entry], n) for n in names):
                raise AdapterError(f"adapter_config.json: target module {entry!r} is not one of the supported "
                                   f"projections ({', '.join(PROJECTIONS)}); is this adapter for another model?")
    exclude_re = _compile("exclude_modules", exclude)[0] if isinstance(exclude, str) else None

    def targeted(name: str) -> bool:
        if (exclude_re is not None and exclude_re.fullmatch(name)) or (
            isinstance(exclude, list) and _list_match(exclude, name)
        ):
            return False
        if regex is not None:
            return regex.fullmatch(name) is not None
        assert isinstance(targets, list)
        if name in targets:  # peft: an exact full name is taken as is, layer filters do not apply
            return True
        if not _list_match(targets, name):
            return False
        if layers is None or layers == []:
            return True
        return _layer_selected(name, layers, layers_pattern)

    found = {n for n in names if targeted(n)}
    for name in sorted(found):
        short = name.rsplit(".", 1)[-1]
        if short in _EMBEDDING_MODULES:
            raise AdapterError(f"adapter_config.json: LoRA on {short} ({name}) is not supported; "
                               f"only the projections {', '.join(PROJECTIONS)} are")
        if short not in PROJECTIONS or name.split(".")[-2] != PROJECTIONS[short]:
            raise AdapterError(f"adapter_config.json: target_modules matches {name}, which is not one of the "
                               f"supported projections ({', '.join(PROJECTIONS)})")
    if not found:
        raise AdapterError(
            f"adapter_config.json: the adapter matches no module of the base model (target_modules={targets!r}, "
            f"layers_to_transform={layers!r}, layers_pattern={layers_pattern!r}, exclude_modules={exclude!r})"
        )
    return found


def _layer_selected(name: str, layers: int | list[int], layers_pattern: str | list[str] | None) -> bool:
    # peft: the first numbered path segment (after `layers_pattern` if given) is the layer index.
    match = None
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if match is not None:
                break
    if match is None:
        return False
    idx = int(match.group("idx"))
    return idx == layers if isinstance(layers, int) else idx in layers
