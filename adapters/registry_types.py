"""The registry's vocabulary, free of SQLite: errors, adapter references, the records it returns and its page tokens.

Kept apart from adapters.registry so the API layer can map errors to status codes and parse references
without the storage code. Errors -> gRPC codes: InvalidRegistryArgument (InvalidAdapterName, InvalidPageToken)
-> INVALID_ARGUMENT; AdapterNotFound -> NOT_FOUND; AdapterExists -> ALREADY_EXISTS; AdapterInUse,
VersionIsCurrent, VersionFilesMissing -> FAILED_PRECONDITION; AdapterPermissionDenied -> PERMISSION_DENIED;
DatabaseUnavailable -> UNAVAILABLE.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from adapters.errors import quote
from adapters.store import VERSION_ID_RE

if TYPE_CHECKING:
    from adapters.peft_format import ParsedAdapter

__all__ = [
    "LOCAL_OWNER", "MAX_DESCRIPTION_CHARS", "MAX_REF_CHARS", "NAME_RE", "PUBLIC", "TENANT_RE", "AdapterExists",
    "AdapterInUse", "AdapterInfo", "AdapterNotFound", "AdapterPage", "AdapterPermissionDenied", "AdapterRef", "AdapterVersion",
    "DatabaseUnavailable",
    "InvalidAdapterName", "InvalidPageToken", "InvalidRegistryArgument", "Promotion", "Registered", "RegistryError",
    "VersionFilesMissing", "VersionIsCurrent", "VersionMeta", "Visibility", "check_name", "check_tenant",
    "decode_page_token", "encode_page_token",
]

NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
# Tenant ids come from the server's auth config; no '/' or '@', so a ref `owner/name@v` parses one way.
TENANT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
SEQ_RE = re.compile(r"[1-9][0-9]{0,9}")  # `name@N`
PUBLIC = "*"
# Owner of the service's own adapters (`serve --adapter NAME=DIR`), public to all tenants.
LOCAL_OWNER = "local"
MAX_DESCRIPTION_CHARS = 4096
MAX_REF_CHARS = 256  # an adapter reference `[owner/]name[@version]`, at most 128 + 1 + 63 + 1 + 26


class RegistryError(Exception):
    """Base of the registry's errors; messages are meant for the person who made the request."""


class InvalidRegistryArgument(RegistryError, ValueError):
    pass


class InvalidAdapterName(InvalidRegistryArgument):
    """A malformed adapter name or reference."""


class InvalidPageToken(InvalidRegistryArgument):
    pass


class AdapterNotFound(RegistryError, LookupError):
    pass


class AdapterExists(RegistryError):
    pass


class AdapterInUse(RegistryError):
    pass


class VersionIsCurrent(RegistryError):
    pass


class VersionFilesMissing(RegistryError):
    pass


class AdapterPermissionDenied(RegistryError):
    pass


class DatabaseUnavailable(RegistryError):
    """The control-plane database (PostgreSQL) cannot be reached now: the call may be retried (UNAVAILABLE)."""


def check_name(name: object) -> str:
    if not isinstance(name, str) or NAME_RE.fullmatch(name) is None or ".." in name:
        raise InvalidAdapterName(
            f"{quote(name)} is not a valid adapter name: use 1 to 63 lowercase letters, digits, '.', '_' "
            f"or '-', starting with a letter or digit, without '..'")
    return name


def check_tenant(tenant: object) -> str:
    if not isinstance(tenant, str) or TENANT_RE.fullmatch(tenant) is None:
        raise InvalidRegistryArgument(f"{quote(tenant)} is not a valid tenant id")
    return tenant


@dataclass(frozen=True)
class AdapterRef:
    """A parsed `[owner/]name[@version]`; version is a version id or a 1-based number, as a string."""

    owner: str | None
    name: str
    version: str | None = None

    @classmethod
    def parse(cls, ref: object) -> AdapterRef:
        if not isinstance(ref, str) or not ref or len(ref) > MAX_REF_CHARS:
            raise InvalidAdapterName(f"{quote(ref)} is not an adapter reference ([owner/]name[@version])")
        head, at, version = ref.partition("@")
        owner, slash, name = head.rpartition("/")
        if slash:
            try:
                check_tenant(owner)
            except InvalidRegistryArgument:
                raise InvalidAdapterName(f"{quote(ref)}: {quote(owner)} is not a valid tenant id") from None
        check_name(name)
        if at and not (VERSION_ID_RE.fullmatch(version) or SEQ_RE.fullmatch(version)):
            raise InvalidAdapterName(f"{quote(ref)}: the version after '@' must be a version id (v-<24 hex chars>) "
                                     f"or a version number (1, 2, ...)")
        return cls(owner=owner if slash else None, name=name, version=version if at else None)

    def owners(self, tenant: str) -> tuple[str, ...]:
        """The owners whose adapter `self` may name for `tenant`, first match wins: the one written, or for an
        unqualified name the tenant's own and then the service's. Never another tenant's: what others
        publish must not change what a name means (they are named `owner/name`)."""
        if self.owner is not None:
            return (self.owner,)
        return (tenant,) if tenant == LOCAL_OWNER else (tenant, LOCAL_OWNER)

    @property
    def base(self) -> str:
        """The adapter part as the caller wrote it, for messages."""
        return f"{self.owner}/{self.name}" if self.owner else self.name


@dataclass(frozen=True)
class VersionMeta:
    """What the registry records about a version besides its id (all derived from the files)."""

    size_bytes: int
    rank: int
    target_modules: tuple[str, ...]
    base_model_id: str
    description: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_modules", tuple(sorted(set(self.target_modules))))
        if self.size_bytes < 0 or self.rank < 1 or not self.target_modules or not self.base_model_id:
            raise InvalidRegistryArgument(f"incomplete adapter version metadata: {self}")
        if len(self.description) > MAX_DESCRIPTION_CHARS:
            raise InvalidRegistryArgument(f"the description has {len(self.description)} characters; "
                                          f"at most {MAX_DESCRIPTION_CHARS} are allowed")

    @classmethod
    def of(cls, parsed: ParsedAdapter, base_model_id: str, size_bytes: int, description: str = "") -> VersionMeta:
        return cls(size_bytes=size_bytes, rank=parsed.max_rank, target_modules=tuple(parsed.target_modules),
                   base_model_id=base_model_id, description=description)


@dataclass(frozen=True)
class AdapterVersion:
    owner: str
    name: str
    version_id: str
    number: int  # 1-based registration order within the adapter: `name@number`
    created_at: float  # unix seconds
    description: str
    size_bytes: int
    rank: int
    target_modules: tuple[str, ...]
    base_model_id: str

    @property
    def ref(self) -> str:
        return f"{self.owner}/{self.name}@{self.version_id}"


Visibility = Literal["private", "shared", "public"]


@dataclass(frozen=True)
class AdapterInfo:
    owner: str
    name: str
    created_at: float
    visibility: Visibility
    shared_with: tuple[str, ...]  # only shown to the owner and admins: grantees do not learn of each other
    current: AdapterVersion
    num_versions: int
    versions: tuple[AdapterVersion, ...] = ()  # filled by get(), oldest first; list() leaves it empty


@dataclass(frozen=True)
class AdapterPage:
    adapters: tuple[AdapterInfo, ...]
    next_page_token: str  # "" on the last page


@dataclass(frozen=True)
class Registered:
    version: AdapterVersion
    created: bool  # False: this adapter already had this exact content (a re-upload, deduplicated)
    current: bool  # the name points at this version now


@dataclass(frozen=True)
class Promotion:
    """One re-pointing of an adapter's name: the n-th (`seq`), from `previous` (None: its first version) to
    `current`, by which tenant."""

    seq: int
    at: float
    previous: str | None
    current: str
    by: str


def encode_page_token(name: str, owner: str) -> str:
    """The opaque token of a listing page that continues after adapter `owner/name`."""
    return base64.urlsafe_b64encode(json.dumps([name, owner]).encode()).decode().rstrip("=")


def decode_page_token(token: str) -> tuple[str, str]:
    """(name, owner) a page token continues after; InvalidPageToken for one this server did not return."""
    try:
        value = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        value = None
    if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value)):
        raise InvalidPageToken(f"page_token {quote(token, 40)} is not one this server returned")
    return value[0], value[1]
