"""Tenants: who may call the server, how a caller proves who it is, and how much each tenant may use.

- The tenants file (YAML) lists each tenant's id, its API keys as `sha256:<64 hex>` hashes (a plain key
  never sits on disk: `hash_api_key` / `loraserve tenants hash-key` turn a key into the line to store),
  whether it is an admin, the client-certificate identities that map to it (mTLS), its limits and its share
  `weight` (fair sharing of the engine between backlogged tenants: `service.engine.fairness`).
  Everything is validated at load; an error names the file, the tenant and the field.
- Without a tenants file the server runs in open access (development): every caller is the admin tenant
  `default`, without limits.
- Per-request bounds (prompt, output, upload size) are checked here and refused with `RequestOverLimit`, a
  ValueError: that request never succeeds for that tenant. The limits that depend on what else is running
  (concurrency, token rate) are enforced by `service.limits.TenantLimiter`.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from adapters.registry_types import InvalidRegistryArgument, check_tenant

__all__ = [
    "DEFAULT_MAX_UPLOAD_BYTES", "KEY_HASH_RE", "MIN_API_KEY_CHARS", "OPEN_ACCESS_TENANT", "RequestOverLimit",
    "Tenant", "TenantConfigError", "TenantDirectory", "TenantLimits", "cert_identities", "generate_api_key",
    "hash_api_key",
]

DEFAULT_MAX_UPLOAD_BYTES = 64 * 1024 * 1024
KEY_HASH_RE = re.compile(r"sha256:[0-9a-f]{64}")
MIN_API_KEY_CHARS = 16  # shorter keys can be guessed; generate_api_key makes 43-character ones
OPEN_ACCESS_TENANT = "default"
DEFAULT_MAX_LOADED_ADAPTERS = 16
MAX_WEIGHT = 1000.0  # share weights are relative; a wider range only invites a typo's starvation
_HASH_KEY_HINT = ("store its hash instead: run `loraserve tenants hash-key` and paste the sha256:... line "
                  "it prints")


class TenantConfigError(ValueError):
    """The tenants file or a tenant definition is invalid."""


class RequestOverLimit(ValueError):
    """A request is larger than its tenant may ever send (INVALID_ARGUMENT: retrying cannot help)."""


def hash_api_key(key: str) -> str:
    """The line to store in the tenants file for `key`: `sha256:<64 lowercase hex>`."""
    if not isinstance(key, str) or not key:
        raise ValueError("the API key is empty")
    if key != key.strip():
        raise ValueError("the API key has leading or trailing whitespace (a copy-paste slip?); remove it")
    if len(key) < MIN_API_KEY_CHARS:
        raise ValueError(f"the API key has {len(key)} characters; use at least {MIN_API_KEY_CHARS} "
                         f"(a generated key is safest)")
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def generate_api_key() -> str:
    """A fresh random API key (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


def cert_identities(auth_context: Mapping[str, Iterable[bytes | str]]) -> list[str]:
    """The identities of a verified client certificate, from a gRPC auth context, in the form the tenants
    file uses: `CN=<common name>` for the subject's common name, and each subject alternative name as is."""
    def text(v: bytes | str) -> str:
        return v.decode("utf-8", "replace") if isinstance(v, bytes) else v
    out = ["CN=" + text(v) for v in auth_context.get("x509_common_name", ())]
    return out + [text(v) for v in auth_context.get("x509_subject_alternative_name", ())]


@dataclass(frozen=True)
class TenantLimits:
    """Per-tenant limits; None means no limit."""

    max_concurrent_requests: int | None = None
    tokens_per_minute: int | None = None  # prompt + output tokens, as a continuously refilled bucket
    max_prompt_tokens: int | None = None
    max_output_tokens: int | None = None
    max_upload_bytes: int | None = DEFAULT_MAX_UPLOAD_BYTES
    # Versions this tenant may hold pinned in host memory with LoadAdapter at once (pins crowd the cache).
    max_loaded_adapters: int | None = DEFAULT_MAX_LOADED_ADAPTERS

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise TenantConfigError(f"{f.name}={value!r} is invalid: a limit is a positive integer, "
                                        f"or null for no limit")

    @classmethod
    def unlimited(cls) -> TenantLimits:
        return cls(max_upload_bytes=None, max_loaded_adapters=None)


@dataclass(frozen=True)
class Tenant:
    id: str
    admin: bool = False
    limits: TenantLimits = field(default_factory=TenantLimits)
    key_hashes: tuple[str, ...] = ()  # `sha256:<hex>` of each API key
    cert_subjects: tuple[str, ...] = ()  # `CN=<common name>` or a subject alternative name
    # Its share of the engine under fair sharing (`vtc`): backlogged tenants are served in proportion.
    weight: float = 1.0

    def __post_init__(self) -> None:
        try:
            check_tenant(self.id)
        except InvalidRegistryArgument as e:
            raise TenantConfigError(f"id: {e}: use 1 to 128 letters, digits, '.', '_', ':' or '-', "
                                    f"starting with a letter or digit") from None
        if not isinstance(self.admin, bool):
            raise TenantConfigError(f"admin: {self.admin!r} is not true or false")
        w = self.weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not (0 < w <= MAX_WEIGHT):
            raise TenantConfigError(f"weight: {w!r} is invalid: a share weight is a number > 0 and at most "
                                    f"{MAX_WEIGHT:g} (1 is the default share)")
        object.__setattr__(self, "weight", float(w))
        if not isinstance(self.limits, TenantLimits):
            raise TenantConfigError(f"limits: expected TenantLimits, got {type(self.limits).__name__}")
        object.__setattr__(self, "key_hashes", tuple(self.key_hashes))
        object.__setattr__(self, "cert_subjects", tuple(self.cert_subjects))
        for i, h in enumerate(self.key_hashes):
            _check_key_hash(h, f"api_keys[{i}]")
        for i, s in enumerate(self.cert_subjects):
            if not isinstance(s, str) or not s.strip() or s != s.strip():
                raise TenantConfigError(f"client_cert_subjects[{i}]: {repr(s)[:80]} is not a certificate "
                                        f"identity: write CN=<common name> or a subject alternative name, "
                                        f"without surrounding spaces")
        for name, values in (("api_keys", self.key_hashes), ("client_cert_subjects", self.cert_subjects)):
            if len(set(values)) != len(values):
                raise TenantConfigError(f"{name}: lists the same entry twice")

    def check_request(self, prompt_tokens: int, max_output_tokens: int | None) -> None:
        """RequestOverLimit if the prompt or the requested output is longer than this tenant may use."""
        lim = self.limits
        if lim.max_prompt_tokens is not None and prompt_tokens > lim.max_prompt_tokens:
            raise RequestOverLimit(f"the prompt has {prompt_tokens} tokens; tenant {self.id!r} may send at "
                                   f"most {lim.max_prompt_tokens} (max_prompt_tokens)")
        if lim.max_output_tokens is not None and max_output_tokens is not None \
                and max_output_tokens > lim.max_output_tokens:
            raise RequestOverLimit(f"max_tokens={max_output_tokens} is more than tenant {self.id!r} may "
                                   f"generate per request; ask for at most {lim.max_output_tokens} "
                                   f"(max_output_tokens)")

    def check_upload(self, size_bytes: int) -> None:
        """RequestOverLimit if an upload of `size_bytes` is larger than this tenant may upload."""
        cap = self.limits.max_upload_bytes
        if cap is not None and size_bytes > cap:
            raise RequestOverLimit(f"the upload is {size_bytes} bytes; tenant {self.id!r} may upload at most "
                                   f"{cap} bytes ({cap / 2**20:g} MiB, max_upload_bytes)")


def _check_key_hash(value: object, where: str) -> str:
    # Never echo the value: if it is a plain key, the message would leak it into logs.
    if not isinstance(value, str):
        raise TenantConfigError(f"{where}: expected a string sha256:<64 hex digits>, got "
                                f"{type(value).__name__}")
    if KEY_HASH_RE.fullmatch(value):
        return value
    if not value.startswith("sha256:"):
        raise TenantConfigError(f"{where}: this looks like a plain API key, and keys are never stored in the "
                                f"clear; {_HASH_KEY_HINT}")
    digest = value[len("sha256:"):]
    if re.fullmatch(r"[0-9a-fA-F]{64}", digest):
        raise TenantConfigError(f"{where}: the hex digits of a key hash must be lowercase")
    problem = (f"this one has {len(digest)} characters after sha256:" if len(digest) != 64
               else "this one has characters other than 0-9 and a-f")
    raise TenantConfigError(f"{where}: a key hash is sha256: followed by 64 lowercase hex digits; {problem}")


class TenantDirectory:
    """The tenants the server knows, and the look-ups that turn credentials into one of them. Immutable:
    reloading the file builds a new directory."""

    def __init__(self, tenants: Iterable[Tenant], *, auth_required: bool = True, source: str = "tenants"):
        self._by_id: dict[str, Tenant] = {}
        self._keys: list[tuple[bytes, Tenant]] = []  # (sha256 digest, tenant): scanned, never dict-indexed
        self._certs: dict[str, Tenant] = {}
        key_owner: dict[str, str] = {}
        for t in tenants:
            if t.id in self._by_id:
                raise TenantConfigError(f"{source}: tenant id {t.id!r} is listed twice")
            self._by_id[t.id] = t
            for h in t.key_hashes:
                if h in key_owner:
                    raise TenantConfigError(f"{source}: tenants {key_owner[h]!r} and {t.id!r} both list the "
                                            f"API key hash {h[:15]}...; each key belongs to one tenant")
                key_owner[h] = t.id
                self._keys.append((bytes.fromhex(h[len("sha256:"):]), t))
            for s in t.cert_subjects:
                if s in self._certs:
                    raise TenantConfigError(f"{source}: tenants {self._certs[s].id!r} and {t.id!r} both list "
                                            f"the client certificate identity {s!r}")
                self._certs[s] = t
        self._auth_required = auth_required

    @classmethod
    def open_access(cls) -> TenantDirectory:
        """Authentication disabled (development): one admin tenant `default` without limits."""
        return cls([Tenant(OPEN_ACCESS_TENANT, admin=True, limits=TenantLimits.unlimited())],
                   auth_required=False, source="open access")

    @classmethod
    def load(cls, path: str | Path) -> TenantDirectory:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise TenantConfigError(f"cannot read the tenants file {path}: {e}") from None
        try:
            stream = io.StringIO(text)
            stream.name = str(path)  # so that YAML error marks name the file
            data = yaml.load(stream, Loader=_StrictLoader)  # safe_load, refusing repeated mapping keys
        except yaml.YAMLError as e:
            raise TenantConfigError(f"{path} is not valid YAML: {e}") from None
        return cls(_parse(data, str(path)), source=str(path))

    @property
    def auth_required(self) -> bool:
        return self._auth_required

    @property
    def anonymous(self) -> Tenant | None:
        """The tenant an unauthenticated call acts as: `default` in open access, else None."""
        return None if self._auth_required else self._by_id[OPEN_ACCESS_TENANT]

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(sorted(self._by_id))

    def weight(self, tenant_id: str) -> float:
        """The tenant's share weight; 1 for an id this directory does not know."""
        tenant = self.get(tenant_id)
        return tenant.weight if tenant is not None else 1.0

    def get(self, tenant_id: str) -> Tenant | None:
        return self._by_id.get(tenant_id)

    def authenticate_key(self, key: str | None) -> Tenant | None:
        """The tenant owning API key `key`, or None. Compares the key's sha256 with every stored hash in
        constant time and without stopping at a match, so timing does not tell which hash matched."""
        if not isinstance(key, str) or not key:
            return None
        try:
            digest = hashlib.sha256(key.encode()).digest()
        except UnicodeEncodeError:  # lone surrogates: no stored key can match
            return None
        found: Tenant | None = None
        for stored, tenant in self._keys:
            if hmac.compare_digest(stored, digest):
                found = tenant
        return found

    def authenticate_cert(self, subjects: Iterable[str]) -> Tenant | None:
        """The tenant a verified client certificate maps to, or None. `subjects` are its identities as
        `cert_identities` writes them (`CN=<common name>`, SAN values); each is compared exactly with the
        tenants' `client_cert_subjects`. Identities mapping to two different tenants give None."""
        if isinstance(subjects, str):
            subjects = (subjects,)
        matched = {self._certs[s].id: self._certs[s] for s in subjects if s in self._certs}
        return next(iter(matched.values())) if len(matched) == 1 else None


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key repeated in one mapping (safe_load silently keeps the last one,
    which could drop a tenant's keys or limits without a word)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str) and key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"the key {key!r} is repeated",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_TENANT_FIELDS = ("id", "api_keys", "admin", "client_cert_subjects", "limits", "weight")
_LIMIT_FIELDS = tuple(f.name for f in fields(TenantLimits))


def _parse(data: object, source: str) -> list[Tenant]:
    if data is None:
        raise TenantConfigError(f"{source} is empty; it should hold `tenants:` and a list of tenants")
    if not isinstance(data, dict) or set(data) != {"tenants"}:
        extra = sorted(map(str, set(data) - {"tenants"})) if isinstance(data, dict) else []
        raise TenantConfigError(f"{source}: the file must be a mapping with the single key `tenants`"
                                + (f"; unknown key(s): {', '.join(extra)}" if extra else ""))
    entries = data["tenants"]
    if not isinstance(entries, list) or not entries:
        raise TenantConfigError(f"{source}: `tenants` must be a non-empty list of tenants (to run without "
                                f"authentication, start the server without a tenants file)")
    return [_parse_tenant(entry, source, i) for i, entry in enumerate(entries)]


def _parse_tenant(entry: object, source: str, index: int) -> Tenant:
    where = f"{source}: tenants[{index}]"
    if not isinstance(entry, dict):
        raise TenantConfigError(f"{where}: a tenant is a mapping with the fields {', '.join(_TENANT_FIELDS)}")
    if isinstance(entry.get("id"), str):
        where = f"{source}: tenant {entry['id']!r}"
    unknown = sorted(map(str, set(entry) - set(_TENANT_FIELDS)))
    if unknown:
        raise TenantConfigError(f"{where}: unknown field(s) {', '.join(unknown)}; allowed: "
                                f"{', '.join(_TENANT_FIELDS)}")
    if "id" not in entry:
        raise TenantConfigError(f"{where}: the field `id` is missing")
    lists: dict[str, tuple[Any, ...]] = {}
    for name in ("api_keys", "client_cert_subjects"):
        value = entry.get(name, [])
        if not isinstance(value, list):
            raise TenantConfigError(f"{where}: {name} must be a list, got {type(value).__name__}")
        lists[name] = tuple(value)
    for i, h in enumerate(lists["api_keys"]):
        _check_key_hash(h, f"{where}: api_keys[{i}]")
    limits = entry.get("limits")
    limits = {} if limits is None else limits
    if not isinstance(limits, dict):
        raise TenantConfigError(f"{where}: limits must be a mapping of {', '.join(_LIMIT_FIELDS)}")
    unknown = sorted(map(str, set(limits) - set(_LIMIT_FIELDS)))
    if unknown:
        raise TenantConfigError(f"{where}: limits: unknown limit(s) {', '.join(unknown)}; allowed: "
                                f"{', '.join(_LIMIT_FIELDS)}")
    try:
        parsed_limits = TenantLimits(**limits)
    except TenantConfigError as e:
        raise TenantConfigError(f"{where}: limits.{e}") from None
    try:
        return Tenant(id=entry["id"], admin=entry.get("admin", False), limits=parsed_limits,
                      key_hashes=lists["api_keys"], cert_subjects=lists["client_cert_subjects"],
                      weight=entry.get("weight", 1.0))
    except TenantConfigError as e:
        raise TenantConfigError(f"{where}: {e}") from None
