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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol

from adapters.errors import AdapterError, quote
from adapters.peft_regex import RegexBudget, compile_bounded


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
# Bounds on regexes from configs (see adapters.peft_regex): matching them against every module name stays ~1 s.
_MAX_CHOICES_PER_KEY = 3
_KEY_PREFIX_CHOICES = 2  # peft wraps a pattern key as `(.*\.)?(key)$`: the `?` and the `.*`
_PATTERN_KEYS_CHOICE_BUDGET = 32
_MAX_PATTERN_KEYS = 4096  # also caps list entries (target/exclude modules, layers_to_transform)
_MAX_NAME_CHARS = 512  # a list entry of target/exclude modules or layers_pattern
_MAX_ALPHA = 65536  # |lora_alpha|: far above any trained adapter's, and scale stays a finite float
_MAX_LAYER_INDEX = 65535

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
    """Validate an `adapter_config.json` and resolve it against `arch`; raise AdapterError if refused.

    Every key read is checked for type, range and size; the message names the key and quotes a bounded
    prefix of the value (adapters.errors.quote). Keys we do not read are ignored whatever they hold.
    """
    cfg = _load_json(raw)
    peft_type = cfg.get("peft_type")
    if peft_type != "LORA":
        raise AdapterError(f"adapter_config.json: peft_type {quote(peft_type)} is not supported; only LORA "
                           "adapters are")
    for key, feature in _UNSUPPORTED_FEATURES.items():
        if cfg.get(key):
            raise AdapterError(f"adapter_config.json: {feature} is not supported (got {key}={quote(cfg[key])})")
    if cfg.get("bias") not in (None, "none"):
        raise AdapterError(f"adapter_config.json: bias={quote(cfg['bias'])} is not supported; only bias='none' is")
    init = cfg.get("init_lora_weights", True)
    if not isinstance(init, (bool, str, type(None))):
        raise AdapterError(f"adapter_config.json: key 'init_lora_weights' must be true, false or the name of an "
                           f"initialisation, got {quote(init)}")
    if isinstance(init, str) and init.lower().startswith(_BASE_MUTATING_INITS):
        raise AdapterError(
            f"adapter_config.json: init_lora_weights={quote(init)} adapters need rewritten base weights; convert "
            "it to plain LoRA with peft's save_pretrained(path_initial_model_for_weight_conversion=...)"
        )

    if "r" not in cfg:
        raise AdapterError("adapter_config.json: required key 'r' is missing")
    r = _rank(cfg["r"], "key 'r'", max_rank)
    alpha = _alpha(8 if cfg.get("lora_alpha") is None else cfg["lora_alpha"], "key 'lora_alpha'")
    use_rslora = _typed(cfg, "use_rslora", bool, False, "true or false")
    fan_in_fan_out = _typed(cfg, "fan_in_fan_out", bool, False, "true or false")
    budget = RegexBudget()
    rank_pattern = _pattern(cfg, "rank_pattern", lambda v, where: _rank(v, where, max_rank), budget)
    alpha_pattern = _pattern(cfg, "alpha_pattern", _alpha, budget)
    base_name = cfg.get("base_model_name_or_path")

    names = llama_module_names(arch.num_layers)
    targeted = _resolve_targets(cfg, names, budget)
    modules: dict[tuple[int, str], ModuleLora] = {}
    for layer in range(arch.num_layers):
        for proj in PROJECTIONS:
            key = module_name(layer, proj)
            if key not in targeted:
                continue
            rank = _pattern_value(rank_pattern, key, r)
            a = _pattern_value(alpha_pattern, key, alpha)
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
    except (ValueError, RecursionError) as e:  # incl. UnicodeDecodeError, and ints of over 4300 digits
        raise AdapterError(f"adapter_config.json is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise AdapterError("adapter_config.json must hold a JSON object")
    return cfg


def _typed(cfg: Mapping[str, Any], key: str, type_: type, default: Any, expected: str) -> Any:
    """cfg[key] if it is a `type_` (JSON null or no key: `default`)."""
    value = cfg.get(key)
    if value is None:
        return default
    if not isinstance(value, type_):
        raise AdapterError(f"adapter_config.json: key {key!r} must be {expected}, got {quote(value)}")
    return value


def _rank(value: Any, where: str, max_rank: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= max_rank:
        raise AdapterError(f"adapter_config.json: {where} must be an integer from 1 to {max_rank} (the "
                           f"server's max_rank), got {quote(value)}")
    return value


def _alpha(value: Any, where: str) -> int | float:
    # Compared before any float(): a JSON integer like 10**400 has no float; NaN fails every comparison.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not -_MAX_ALPHA <= value <= _MAX_ALPHA:
        raise AdapterError(f"adapter_config.json: {where} must be a finite number from {-_MAX_ALPHA} to "
                           f"{_MAX_ALPHA}, got {quote(value)}")
    return value


def _pattern(
    cfg: Mapping[str, Any], key: str, check: Callable[[Any, str], Any], budget: RegexBudget
) -> list[tuple[re.Pattern[str], Any]]:
    """(compiled peft key regex, checked value) in file order: peft takes the first key that matches."""
    patterns = _typed(cfg, key, dict, {}, "an object mapping module-name regexes to values")
    if len(patterns) > _MAX_PATTERN_KEYS:
        raise AdapterError(f"adapter_config.json: {key} has {len(patterns)} keys; at most {_MAX_PATTERN_KEYS} "
                           "are allowed")
    out, choices_left = [], _PATTERN_KEYS_CHOICE_BUDGET
    for k, v in patterns.items():
        where = f"{key}[{quote(k)}]"
        value = check(v, where)
        # peft `get_pattern_key`: the key matches a dot-separated suffix of the module name.
        regex, choices = compile_bounded(where, rf"(.*\.)?({k})$", budget, max_choices=_MAX_CHOICES_PER_KEY,
                                         wrapper_choices=_KEY_PREFIX_CHOICES)
        choices_left -= choices
        if choices_left < 0:
            raise AdapterError(f"adapter_config.json: the keys of {key} are too complex regular expressions "
                               f"(more than {_PATTERN_KEYS_CHOICE_BUDGET} repetitions or alternations in all)")
        out.append((regex, value))
    return out


def _pattern_value(patterns: list[tuple[re.Pattern[str], Any]], name: str, default: Any) -> Any:
    return next((v for regex, v in patterns if regex.match(name)), default)


def _names_list(cfg: Mapping[str, Any], key: str) -> list[str] | str | None:
    """A regex (checked where it is compiled) or a list of module names, each non-empty and bounded."""
    value = cfg.get(key)
    if value is None or isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise AdapterError(f"adapter_config.json: key {key!r} must be a string or a list of names, got "
                           f"{quote(value)}")
    if len(value) > _MAX_PATTERN_KEYS:
        raise AdapterError(f"adapter_config.json: {key} has {len(value)} entries; at most {_MAX_PATTERN_KEYS} "
                           "are allowed")
    for i, entry in enumerate(value):
        if not isinstance(entry, str) or not 1 <= len(entry) <= _MAX_NAME_CHARS:
            raise AdapterError(f"adapter_config.json: {key}[{i}] must be a name of 1 to {_MAX_NAME_CHARS} "
                               f"characters, got {quote(entry)}")
    return value


def _layer_indices(cfg: Mapping[str, Any]) -> int | list[int] | None:
    layers = cfg.get("layers_to_transform")
    if layers is None:
        return None
    entries = layers if isinstance(layers, list) else [layers]
    if len(entries) > _MAX_PATTERN_KEYS:
        raise AdapterError(f"adapter_config.json: layers_to_transform has {len(entries)} entries; at most "
                           f"{_MAX_PATTERN_KEYS} are allowed")
    for i in entries:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i <= _MAX_LAYER_INDEX:
            raise AdapterError(f"adapter_config.json: key 'layers_to_transform' must be a layer index or a list "
                               f"of them, integers from 0 to {_MAX_LAYER_INDEX}, got {quote(layers)}")
    return layers


def _list_match(entries: list[str], name: str) -> bool:
    return name in entries or any(name.endswith("." + e) for e in entries)


def _resolve_targets(cfg: Mapping[str, Any], names: list[str], budget: RegexBudget) -> set[str]:
    """The module names peft would wrap with LoRA; refuse any that is not one of our projections."""
    targets = _names_list(cfg, "target_modules")
    if targets is None or targets == []:
        raise AdapterError("adapter_config.json: required key 'target_modules' is missing or empty")
    layers = _layer_indices(cfg)
    layers_pattern = _names_list(cfg, "layers_pattern")
    # peft: the first numbered path segment after `layers_pattern` (any segment if none) is the layer index.
    layer_res = [
        compile_bounded("layers_pattern", rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", budget)[0]
        for p in ([layers_pattern] if isinstance(layers_pattern, str) else layers_pattern or []) if p
    ] or [re.compile(r".*?\.[^.]*\.(?P<idx>\d+)\.")]
    exclude = _names_list(cfg, "exclude_modules")

    if isinstance(targets, str) and (layers is not None or layers_pattern is not None):
        raise AdapterError("adapter_config.json: layers_to_transform/layers_pattern cannot be used when "
                           "target_modules is a string (peft's LoraConfig refuses this too)")
    regex: re.Pattern[str] | None = None
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        # Every nn.Linear but the output head (peft `_maybe_include_all_linear_layers`).
        targets = list(PROJECTIONS)
    elif isinstance(targets, str):
        regex = compile_bounded("target_modules", targets, budget)[0]
    else:
        for entry in targets:
            if not any(_list_match([entry], n) for n in names):
                raise AdapterError(f"adapter_config.json: target module {quote(entry)} is not one of the supported "
                                   f"projections ({', '.join(PROJECTIONS)}); is this adapter for another model?")
    exclude_re = compile_bounded("exclude_modules", exclude, budget)[0] if isinstance(exclude, str) else None

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
        return _layer_selected(name, layers, layer_res)

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
            f"adapter_config.json: the adapter matches no module of the base model (target_modules="
            f"{quote(targets)}, layers_to_transform={quote(layers)}, layers_pattern={quote(layers_pattern)}, "
            f"exclude_modules={quote(exclude)})"
        )
    return found


def _layer_selected(name: str, layers: int | list[int], layer_res: list[re.Pattern[str]]) -> bool:
    """peft: the layer index is the first match's `idx` group, trying the `layers_pattern` regexes in order."""
    match = next((m for m in (r.match(name) for r in layer_res) if m is not None), None)
    if match is None:
        return False
    idx = int(match.group("idx"))
    return idx == layers if isinstance(layers, int) else idx in layers
