"""Tenants: who may call the server, how a caller proves who it is, and how much each tenant may use.

- The tenants file (YAML) lists each tenant's id, its API keys as `sha256:<64 hex>` hashes (a plain key
  never sits on disk: `hash_api_key` / `loraserve tenants hash-key` turn a key into the line to store),
  whether it is an admin, the client-certificate identities that map to it (mTLS) and its limits.
  Everything is validated at load; an error names the file, the tenant and the field.
- Without a tenants file the server runs in open access (development): every caller is the admin tenant
  `default`, without limits.
- `TenantLimiter` enforces the two limits that depend on what else is running: concurrent requests and
  a tokens-per-minute bucket. Refusals are `LimitExceeded` (RESOURCE_EXHAUSTED with a retry hint), not
  ValueError: the same request succeeds later. Per-request bounds (prompt, output, upload size) are
  `RequestOverLimit`, a ValueError: that request never succeeds for that tenant.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import math
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from adapters.registry_types import InvalidRegistryArgument, check_tenant

__all__ = [
    "DEFAULT_MAX_UPLOAD_BYTES", "KEY_HASH_RE", "MIN_API_KEY_CHARS", "OPEN_ACCESS_TENANT", "Lease",
    "LimitExceeded", "RequestOverLimit", "Tenant", "TenantConfigError", "TenantDirectory",
    "TenantLimitExceeded", "TenantLimiter", "TenantLimits", "cert_identities", "generate_api_key",
    "hash_api_key",
]

DEFAULT_MAX_UPLOAD_BYTES = 64 * 1024 * 1024
KEY_HASH_RE = re.compile(r"sha256:[0-9a-f]{64}")
MIN_API_KEY_CHARS = 16  # shorter keys can be guessed; generate_api_key makes 43-character ones
OPEN_ACCESS_TENANT = "default"
DEFAULT_MAX_LOADED_ADAPTERS = 16
_HASH_KEY_HINT = ("store its hash instead: run `loraserve tenants hash-key` and paste the sha256:... line "
                  "it prints")


class TenantConfigError(ValueError):
    """The tenants file or a tenant definition is invalid."""


class RequestOverLimit(ValueError):
    """A request is larger than its tenant may ever send (INVALID_ARGUMENT: retrying cannot help)."""


class LimitExceeded(Exception):
    """A rate or concurrency limit refused a request for now; it may succeed after `retry_after_s`.

    Deliberately not a ValueError: the server answers RESOURCE_EXHAUSTED with a RetryInfo.
    """

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class TenantLimitExceeded(LimitExceeded):
    def __init__(self, message: str, retry_after_s: float, *, tenant: str = "", limit: str = ""):
        super().__init__(message, retry_after_s)
        self.tenant, self.limit = tenant, limit


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

    def __post_init__(self) -> None:
        try:
            check_tenant(self.id)
        except InvalidRegistryArgument as e:
            raise TenantConfigError(f"id: {e}: use 1 to 128 letters, digits, '.', '_', ':' or '-', "
                                    f"starting with a letter or digit") from None
        if not isinstance(self.admin, bool):
            raise TenantConfigError(f"admin: {self.admin!r} is not true or false")
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


_TENANT_FIELDS = ("id", "api_keys", "admin", "client_cert_subjects", "limits")
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
                      key_hashes=lists["api_keys"], cert_subjects=lists["client_cert_subjects"])
    except TenantConfigError as e:
        raise TenantConfigError(f"{where}: {e}") from None


# --- limits that depend on what else is running ------------------------------------------------------------

@dataclass
class _Usage:
    in_flight: int = 0
    level: float | None = None  # tokens left in the bucket (negative: over-charged); None: no bucket
    updated: float = 0.0


class Lease:
    """One admitted request: `charge` adds tokens to its tenant's bucket, `release` ends it (idempotent)."""

    def __init__(self, limiter: TenantLimiter | None, tenant_id: str, state: _Usage | None,
                 tokens_per_minute: int | None, tokens: int):
        self._limiter, self._state, self._tpm = limiter, state, tokens_per_minute
        self.tenant_id = tenant_id
        self.tokens = tokens  # charged so far
        self.released = False

    def charge(self, tokens: int) -> None:
        """Charge `tokens` more (e.g. generated output); may drive the bucket negative, which delays the
        tenant's next requests rather than failing this one."""
        _check_tokens(tokens)
        if self._limiter is None or self._state is None:
            self.tokens += tokens
            return
        with self._limiter._lock:
            self.tokens += tokens
            self._limiter._refill(self._state, self._tpm)
            if self._state.level is not None:
                self._state.level -= tokens

    def release(self) -> None:
        if self._limiter is None or self._state is None:
            self.released = True
            return
        with self._limiter._lock:
            if not self.released:
                self.released = True
                self._state.in_flight -= 1

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _check_tokens(tokens: object) -> None:
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
        raise ValueError(f"tokens={tokens!r} is invalid: a token count is an integer >= 0")


class TenantLimiter:
    """Admits requests under each tenant's max_concurrent_requests and tokens_per_minute.

    The token bucket holds up to tokens_per_minute tokens and refills continuously at tokens_per_minute / 60
    per second. A request is admitted while the bucket is positive and is then charged its tokens, so one
    large request can overdraw it; the tenant waits until the debt is repaid. Limits are read from the
    Tenant at each call, so a reloaded tenants file takes effect at once; state is kept per tenant id.
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic, concurrency_retry_s: float = 1.0):
        self._clock = clock
        self._concurrency_retry_s = concurrency_retry_s  # hint only: when a request ends is unknown
        self._lock = threading.Lock()
        self._states: dict[str, _Usage] = {}

    def acquire(self, tenant: Tenant, tokens: int) -> Lease:
        """Admit one request of `tokens` (prompt) tokens or raise TenantLimitExceeded."""
        _check_tokens(tokens)
        cmax, tpm = tenant.limits.max_concurrent_requests, tenant.limits.tokens_per_minute
        if cmax is None and tpm is None:
            return Lease(None, tenant.id, None, None, tokens)
        with self._lock:
            state = self._states.get(tenant.id)
            if state is None:
                state = self._states[tenant.id] = _Usage(updated=self._clock())
            self._refill(state, tpm)
            if cmax is not None and state.in_flight >= cmax:
                raise TenantLimitExceeded(
                    f"tenant {tenant.id!r} has {state.in_flight} requests in flight, its limit "
                    f"(max_concurrent_requests={cmax}); retry after {self._concurrency_retry_s:g} s or when "
                    f"one of them has finished", self._concurrency_retry_s,
                    tenant=tenant.id, limit="max_concurrent_requests")
            if tpm is not None and state.level is not None and state.level <= 0:
                # Wait until the bucket holds one token again (positive, so the request is admitted).
                retry = (1.0 - state.level) * 60.0 / tpm
                raise TenantLimitExceeded(
                    f"tenant {tenant.id!r} has used up its tokens_per_minute={tpm} limit "
                    f"({math.ceil(-state.level)} tokens over); retry after {retry:.1f} s", retry,
                    tenant=tenant.id, limit="tokens_per_minute")
            state.in_flight += 1
            if state.level is not None:
                state.level -= tokens
            return Lease(self, tenant.id, state, tpm, tokens)

    def in_flight(self, tenant_id: str) -> int:
        with self._lock:
            state = self._states.get(tenant_id)
            return state.in_flight if state else 0

    def tokens_available(self, tenant: Tenant) -> float | None:
        """The bucket level now (negative when overdrawn); None if the tenant has no tokens_per_minute."""
        with self._lock:
            tpm = tenant.limits.tokens_per_minute
            state = self._states.get(tenant.id)
            if state is None:
                return None if tpm is None else float(tpm)
            self._refill(state, tpm)
            return state.level

    def _refill(self, state: _Usage, tpm: int | None) -> None:
        # Caller holds self._lock.
        now = self._clock()
        if tpm is None:
            state.level = None
        elif state.level is None:
            state.level = float(tpm)  # a new bucket (or a limit just added) starts full
        else:
            state.level = min(float(tpm), state.level + max(0.0, now - state.updated) * tpm / 60.0)
        state.updated = now
