"""Adapter files in an S3-compatible bucket, shared by every replica of the service.

Layout under `{prefix}/` (keys are server-made: a checked version id, a random upload id, fixed file names):

    versions/v-0123456789abcdef01234567/manifest.json                     written LAST: the commit point
    versions/v-0123456789abcdef01234567/u-<16 hex>/adapter_config.json
    versions/v-0123456789abcdef01234567/u-<16 hex>/adapter_model.safetensors

A put uploads both files under a fresh upload id, then writes the manifest (format, version id, upload id,
size and sha256 of each file). A version is visible only while its manifest is present and names files
whose sizes (and, on `get`, sha256) match it, so a reader never sees a half-written version: an upload that
died before its manifest, or a manifest whose files are missing or differ, counts as absent. Each upload has
its own key space, so two replicas putting the same version at once never mix their files: the manifest is
written with `If-None-Match: *` (or `If-Match` on a broken one it replaces), the first one wins and the
other's put returns False. On a backend that ignores conditional writes the last manifest wins, and it still
names one complete upload. A delete removes the manifest first, then the files.

`exists` and `list_ids` check each file's size and the sha256 it carries in its metadata against the
manifest without reading the weights; `get` reads the bytes and checks their sha256 against the manifest.

Credentials come from where every S3 client finds them (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY /
AWS_SESSION_TOKEN, AWS_PROFILE, a web identity token on Kubernetes, ...); the config names only the
bucket, prefix, endpoint and region. Opening the store checks that the bucket is reachable with those
credentials (a short connect timeout and two attempts, so a wrong endpoint fails in seconds) and raises
StoreSetupError naming what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any

import boto3
import botocore.exceptions as bce
from botocore.config import Config

from adapters.store import FILE_NAMES, VERSION_ID_RE, NotInStore, StoreError, check_files, check_version_id

__all__ = ["MANIFEST_FILE", "MANIFEST_FORMAT", "S3Settings", "S3Store", "StoreSetupError"]

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "loraserve-adapter-version/1"
_UPLOAD_RE = re.compile(r"u-[0-9a-f]{16}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_PREFIX_RE = re.compile(r"[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*")
_SHA_META = "sha256"  # user metadata on each file object: x-amz-meta-sha256


class StoreSetupError(StoreError, ValueError):
    """The bucket cannot be used as configured: the message says whether credentials, bucket or endpoint."""


@dataclass(frozen=True)
class S3Settings:
    """The config's `store: {kind: s3, ...}` section. Credentials are not here: see the module docstring."""

    bucket: str
    prefix: str = ""  # key prefix inside the bucket, e.g. "loraserve/prod"; "" = the bucket's root
    endpoint_url: str | None = None  # an S3-compatible server (MinIO, Ceph, ...); None = AWS S3
    region: str | None = None  # None = from AWS_REGION / AWS_DEFAULT_REGION / the profile
    connect_timeout_s: float = 2.0
    read_timeout_s: float = 30.0
    max_attempts: int = 2  # total attempts per request (botocore "standard" retries)
    addressing_style: str | None = None  # "path" or "virtual"; default: path with endpoint_url, else auto

    def __post_init__(self) -> None:
        # S3 bucket naming rules: 3-63 chars of lowercase letters, digits, dots and hyphens.
        if not isinstance(self.bucket, str) or not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", self.bucket):
            raise ValueError(f"store.bucket={self.bucket!r} is not a valid bucket name (3-63 lowercase letters, "
                             f"digits, '.' and '-')")
        if self.prefix and (_PREFIX_RE.fullmatch(self.prefix) is None or ".." in self.prefix.split("/")):
            raise ValueError(f"store.prefix={self.prefix!r} is invalid: '/'-separated segments of letters, "
                             f"digits, '.', '_' and '-', without a leading or trailing '/'")
        if self.endpoint_url is not None and not re.match(r"https?://[^/\s]+", self.endpoint_url):
            raise ValueError(f"store.endpoint_url={self.endpoint_url!r} is invalid: expected http(s)://host[:port]")
        if not (self.connect_timeout_s > 0 and self.read_timeout_s > 0):
            raise ValueError("store timeouts must be > 0 seconds")
        if self.max_attempts < 1:
            raise ValueError(f"store.max_attempts={self.max_attempts} is invalid: must be >= 1")
        if self.addressing_style not in (None, "path", "virtual", "auto"):
            raise ValueError(f"store.addressing_style={self.addressing_style!r} is invalid: path, virtual or auto")

    @classmethod
    def from_mapping(cls, settings: Mapping[str, Any]) -> S3Settings:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise ValueError(f"unknown s3 store setting(s) {unknown}; known: {sorted(known)} (credentials come "
                             f"from the AWS_* environment variables, not from the config)")
        if "bucket" not in settings:
            raise ValueError("the s3 store needs a bucket")
        return cls(**settings)


@dataclass(frozen=True)
class _Manifest:
    upload: str
    files: dict[str, tuple[int, str]]  # name -> (size, sha256 hex)
    etag: str
    valid: bool = True  # False: an object at the manifest's key that is not one this store wrote


class S3Store:
    """The Store protocol over one bucket and prefix (see the module docstring for the layout)."""

    def __init__(self, settings: S3Settings, *, session: boto3.Session | None = None) -> None:
        self.settings = settings
        self._bucket = settings.bucket
        self._root = f"{settings.prefix}/versions/" if settings.prefix else "versions/"
        style = settings.addressing_style or ("path" if settings.endpoint_url else "auto")
        config = Config(
            connect_timeout=settings.connect_timeout_s, read_timeout=settings.read_timeout_s,
            retries={"max_attempts": settings.max_attempts, "mode": "standard"},
            s3={"addressing_style": style},
            # Checksums only where the API requires them: several S3-compatible servers reject the
            # CRC headers newer clients add by default. Integrity is ours: sizes and sha256 in the manifest.
            request_checksum_calculation="when_required", response_checksum_validation="when_required",
        )
        self._session = session or boto3.Session()
        try:
            self._s3 = self._session.client("s3", endpoint_url=settings.endpoint_url, region_name=settings.region,
                                            config=config)
        except (ValueError, bce.BotoCoreError) as e:
            raise StoreSetupError(f"cannot set up the S3 client for {self._where()}: {e}") from e
        self._check_bucket()

    def _where(self) -> str:
        return f"bucket {self._bucket!r} at {self.settings.endpoint_url or 'AWS S3'}"

    def _check_bucket(self) -> None:
        where = self._where()
        creds = self._session.get_credentials()
        if creds is None:
            raise StoreSetupError(f"no S3 credentials found for {where}: set AWS_ACCESS_KEY_ID and "
                                  f"AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or a web identity token)")
        try:
            self._s3.head_bucket(Bucket=self._bucket)
        except bce.NoCredentialsError as e:
            raise StoreSetupError(f"no S3 credentials found for {where}: set AWS_ACCESS_KEY_ID and "
                                  f"AWS_SECRET_ACCESS_KEY") from e
        except (bce.EndpointConnectionError, bce.ConnectTimeoutError, bce.ReadTimeoutError) as e:
            raise StoreSetupError(f"cannot reach the S3 endpoint for {where}: {e}") from e
        except bce.ClientError as e:
            code, status = _error_code(e), _status(e)
            if status == 404 or code in ("NoSuchBucket", "404"):
                raise StoreSetupError(f"{where} does not exist: create it or fix store.bucket") from e
            if status in (401, 403):
                raise StoreSetupError(f"access to {where} was denied (HTTP {status}): the credentials from "
                                      f"{creds.method!r} are wrong, expired, or not allowed s3:ListBucket on "
                                      f"it") from e
            if status == 301 or code == "PermanentRedirect":
                raise StoreSetupError(f"{where} is in another region than {self._s3.meta.region_name!r}: set "
                                      f"store.region") from e
            raise StoreSetupError(f"checking {where} failed: {code} (HTTP {status})") from e
        except bce.BotoCoreError as e:
            raise StoreSetupError(f"checking {where} failed: {e}") from e

    # --- the Store protocol -------------------------------------------------------------------------------

    def put(self, version_id: str, files: Mapping[str, bytes]) -> bool:
        check_version_id(version_id)
        blobs = check_files(files)
        with self._errors("storing", version_id):
            current = self._read_manifest(version_id)
            if current is not None and self._check_objects(version_id, current) is None:
                return False  # content-derived id: the stored files compute the same adapter, and stay
            upload = f"u-{uuid.uuid4().hex[:16]}"
            entries = {name: (len(b), hashlib.sha256(b).hexdigest()) for name, b in blobs.items()}
            body = json.dumps({"format": MANIFEST_FORMAT, "version_id": version_id, "upload": upload,
                               "files": {n: {"size": s, "sha256": h} for n, (s, h) in entries.items()}},
                              sort_keys=True, indent=1).encode()
            committed = False
            try:
                for name in FILE_NAMES:
                    self._s3.put_object(Bucket=self._bucket, Key=self._file_key(version_id, upload, name),
                                        Body=blobs[name], Metadata={_SHA_META: entries[name][1]})
                condition = {"IfMatch": current.etag} if current is not None else {"IfNoneMatch": "*"}
                try:
                    self._s3.put_object(Bucket=self._bucket, Key=self._manifest_key(version_id), Body=body,
                                        ContentType="application/json", **condition)
                except bce.ClientError as e:
                    # 412: another writer committed its manifest between our read and our write (409: while
                    # we wrote). Its upload is as good as ours if it is complete.
                    if _status(e) in (409, 412) and self.exists(version_id):
                        return False
                    raise
                committed = True
            finally:
                if not committed:  # best effort: remove_leftovers() collects what this misses
                    self._delete_prefix(f"{self._root}{version_id}/{upload}/")
            if current is not None and current.upload != upload:
                self._delete_prefix(f"{self._root}{version_id}/{current.upload}/")  # the broken version's files
            return True

    def get(self, version_id: str) -> dict[str, bytes]:
        check_version_id(version_id)
        with self._errors("reading", version_id):
            m = self._visible_manifest(version_id)
            out: dict[str, bytes] = {}
            for name in FILE_NAMES:
                try:
                    data = self._s3.get_object(Bucket=self._bucket,
                                               Key=self._file_key(version_id, m.upload, name))["Body"].read()
                except bce.ClientError as e:
                    if _error_code(e) in ("NoSuchKey", "404"):  # deleted while we read: gone, never half there
                        raise NotInStore(f"adapter version {version_id} is not in the store") from None
                    raise
                size, sha = m.files[name]
                if len(data) != size or hashlib.sha256(data).hexdigest() != sha:
                    raise NotInStore(f"adapter version {version_id} is not (completely) in the store: {name} "
                                     f"does not match its manifest")
                out[name] = data
            return out

    def exists(self, version_id: str) -> bool:
        check_version_id(version_id)
        with self._errors("checking", version_id):
            m = self._read_manifest(version_id)
            return m is not None and self._check_objects(version_id, m) is None

    def delete(self, version_id: str) -> bool:
        check_version_id(version_id)
        with self._errors("deleting", version_id):
            m = self._read_manifest(version_id)
            visible = m is not None and self._check_objects(version_id, m) is None
            # The manifest first: from here on readers see no version, whatever happens to the files.
            self._s3.delete_object(Bucket=self._bucket, Key=self._manifest_key(version_id))
            self._delete_prefix(f"{self._root}{version_id}/")
            return visible

    def list_ids(self) -> list[str]:
        with self._errors("listing", None):
            out = []
            for obj in self._list(self._root):
                vid, _, rest = obj["Key"][len(self._root):].partition("/")
                if rest == MANIFEST_FILE and VERSION_ID_RE.fullmatch(vid) is not None:
                    m = self._read_manifest(vid)  # the same checks as exists(): a GET and two HEADs each
                    if m is not None and self._check_objects(vid, m) is None:
                        out.append(vid)
            return sorted(out)

    def nbytes(self, version_id: str) -> int:
        check_version_id(version_id)
        with self._errors("checking", version_id):
            return sum(size for size, _ in self._visible_manifest(version_id).files.values())

    # --- maintenance --------------------------------------------------------------------------------------

    def remove_leftovers(self, older_than_s: float = 3600.0) -> list[str]:
        """Delete files of uploads that never committed (or were replaced) and are older than the bound.

        Never called at open: another replica may be between its file uploads and its manifest. Returns the
        deleted keys (relative to the prefix's versions/)."""
        cutoff = time.time() - older_than_s
        with self._errors("cleaning", None):
            objects = list(self._list(self._root))
            live: dict[str, str | None] = {}
            for obj in objects:
                vid, _, rest = obj["Key"][len(self._root):].partition("/")
                if rest == MANIFEST_FILE and VERSION_ID_RE.fullmatch(vid):
                    m = self._read_manifest(vid)
                    live[vid] = m.upload if m is not None and m.valid else None
            stale = []
            for obj in objects:
                vid, _, rest = obj["Key"][len(self._root):].partition("/")
                upload = rest.partition("/")[0]
                if rest != MANIFEST_FILE and upload != live.get(vid) and obj["LastModified"].timestamp() < cutoff:
                    stale.append(obj["Key"])
            self._delete_keys(stale)
            return [k[len(self._root):] for k in stale]

    def __repr__(self) -> str:
        return f"S3Store({self._where()}, prefix={self.settings.prefix!r})"

    # --- helpers ------------------------------------------------------------------------------------------

    def _manifest_key(self, version_id: str) -> str:
        return f"{self._root}{version_id}/{MANIFEST_FILE}"

    def _file_key(self, version_id: str, upload: str, name: str) -> str:
        return f"{self._root}{version_id}/{upload}/{name}"

    def _read_manifest(self, version_id: str) -> _Manifest | None:
        """The parsed manifest, or None if absent or not one this store wrote (then the version is absent)."""
        try:
            resp = self._s3.get_object(Bucket=self._bucket, Key=self._manifest_key(version_id))
        except bce.ClientError as e:
            if _error_code(e) in ("NoSuchKey", "404"):
                return None
            raise
        etag = resp["ETag"]
        try:
            doc = json.loads(resp["Body"].read())
            files = {n: (doc["files"][n]["size"], doc["files"][n]["sha256"]) for n in FILE_NAMES}
            if (doc["format"] == MANIFEST_FORMAT and doc["version_id"] == version_id
                    and isinstance(doc["upload"], str) and _UPLOAD_RE.fullmatch(doc["upload"])
                    and set(doc["files"]) == set(FILE_NAMES)
                    and all(type(s) is int and s >= 0 and _SHA256_RE.fullmatch(str(h)) for s, h in files.values())):
                return _Manifest(doc["upload"], files, etag)
        except (ValueError, KeyError, TypeError):
            pass
        return _Manifest("", {}, etag, valid=False)  # keeps its etag, so that a put replaces exactly that one

    def _check_objects(self, version_id: str, m: _Manifest) -> str | None:
        """None if both files are there with the manifest's size and sha256 metadata, else what is wrong."""
        if not m.valid:
            return "its manifest is not valid"
        for name, (size, sha) in m.files.items():
            try:
                head = self._s3.head_object(Bucket=self._bucket, Key=self._file_key(version_id, m.upload, name))
            except bce.ClientError as e:
                if _error_code(e) in ("NoSuchKey", "404"):
                    return f"{name} is missing"
                raise
            if head["ContentLength"] != size or head.get("Metadata", {}).get(_SHA_META) != sha:
                return f"{name} does not match its manifest"
        return None

    def _visible_manifest(self, version_id: str) -> _Manifest:
        m = self._read_manifest(version_id)
        if m is None:
            raise NotInStore(f"adapter version {version_id} is not in the store")
        problem = self._check_objects(version_id, m)
        if problem is not None:
            raise NotInStore(f"adapter version {version_id} is not (completely) in the store: {problem}")
        return m

    def _list(self, prefix: str) -> Iterator[dict[str, Any]]:
        for page in self._s3.get_paginator("list_objects_v2").paginate(Bucket=self._bucket, Prefix=prefix):
            yield from page.get("Contents", ())

    def _delete_prefix(self, prefix: str) -> None:
        self._delete_keys([obj["Key"] for obj in self._list(prefix)])

    def _delete_keys(self, keys: list[str]) -> None:
        for i in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            resp = self._s3.delete_objects(Bucket=self._bucket, Delete={
                "Objects": [{"Key": k} for k in keys[i:i + 1000]], "Quiet": True})
            if resp.get("Errors"):
                first = resp["Errors"][0]
                raise StoreError(f"could not delete {first.get('Key')}: {first.get('Code')} {first.get('Message')}")

    @contextmanager
    def _errors(self, action: str, version_id: str | None) -> Iterator[None]:
        """S3 client failures become StoreError naming the operation, the version and the bucket."""
        try:
            yield
        except bce.ClientError as e:
            what = f"adapter version {version_id}" if version_id else "adapter versions"
            raise StoreError(f"{action} {what} in {self._where()} failed: {_error_code(e)} (HTTP {_status(e)})") \
                from e
        except bce.BotoCoreError as e:
            what = f"adapter version {version_id}" if version_id else "adapter versions"
            raise StoreError(f"{action} {what} in {self._where()} failed: {e}") from e


def _error_code(e: bce.ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code", "?"))


def _status(e: bce.ClientError) -> int:
    return int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
