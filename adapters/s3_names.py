"""Adapter names shared by replicas: one JSON document per adapter in the bucket, changed by conditional writes.

The registry (adapters.registry) is SQLite local to one process. With several replicas the bucket holds the
names, and each replica's SQLite is a copy refreshed from it:

    {prefix}/names/{owner}/{name}.json     owner and name match TENANT_RE / NAME_RE, so they are safe key parts

    {"format": "loraserve-adapter-name/1", "owner": "acme", "name": "support-bot", "created_at": 1.7e9,
     "public": false, "shares": ["beta"], "current": "v-...", "next_seq": 4,
     "versions": [{"version_id": "v-...", "seq": 1, "created_at": ..., "description": "", "size_bytes": ...,
                   "rank": 8, "target_modules": ["q_proj"], "base_model_id": "..."}, ...],
     "history": [{"at": 1.7e9, "current": "v-...", "by": "acme"}, ...]}     the last HISTORY_LEN re-points

Every change is a read-modify-write: GET (document and ETag), apply the change, PUT with `If-Match: <ETag>`
(`If-None-Match: *` to create), and on 412 start again from a fresh read. Two replicas promoting the same
name at once both land, one after the other; neither overwrites the other unseen. Version numbers come from
`next_seq` in the document, so `name@N` means the same version on every replica. A version's files are
committed to the store (adapters.s3_store) before any document names it.

`NameBoard.changes()` lists the documents and reads only those whose ETag differs from the last call, so a
replica can poll it every few seconds at the cost of one LIST plus one GET per changed adapter.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import botocore.exceptions as bce

from adapters.registry_types import VersionIsCurrent, check_name, check_tenant
from adapters.store import VERSION_ID_RE, StoreError

__all__ = ["HISTORY_LEN", "NAME_FORMAT", "BadNameDocument", "NameBoard", "NameChanges", "NameConflict"]

NAME_FORMAT = "loraserve-adapter-name/1"
HISTORY_LEN = 100
_VERSION_KEYS = ("version_id", "seq", "created_at", "description", "size_bytes", "rank", "target_modules",
                 "base_model_id")

Doc = dict[str, Any]


class NameConflict(StoreError):
    """Other replicas kept changing the document between our read and our write; retry later."""


class BadNameDocument(StoreError):
    """An object under names/ that is not a well-formed document about the adapter its key names."""


@dataclass(frozen=True)
class NameChanges:
    """What changed since the previous `changes()` call: documents new or rewritten, adapters removed, and
    objects that are not valid documents (key -> why; skipped, and not read again until they change)."""

    updated: dict[tuple[str, str], Doc]
    removed: frozenset[tuple[str, str]]
    invalid: dict[str, str] = field(default_factory=dict)


class NameBoard:
    """The name documents under `{prefix}/names/` of one bucket (an S3 client from adapters.s3_store)."""

    def __init__(self, client: Any, bucket: str, prefix: str = "", *, clock: Callable[[], float] = time.time,
                 attempts: int = 8) -> None:
        self._s3, self._bucket, self._clock, self._attempts = client, bucket, clock, attempts
        self._root = f"{prefix}/names/" if prefix else "names/"
        self._seen: dict[str, str] = {}  # key -> ETag of the last changes() call

    @classmethod
    def for_store(cls, store: Any, **kw: Any) -> NameBoard:
        """The board beside an S3Store: same client, bucket and prefix."""
        return cls(store._s3, store.settings.bucket, store.settings.prefix, **kw)

    def _key(self, owner: str, name: str) -> str:
        return f"{self._root}{check_tenant(owner)}/{check_name(name)}.json"

    # --- reads --------------------------------------------------------------------------------------------

    def read(self, owner: str, name: str) -> Doc | None:
        got = self._get(self._key(owner, name))
        return got[0] if got is not None else None

    def changes(self) -> NameChanges:
        """Documents whose ETag changed since the last call (all of them the first time), and removals."""
        try:
            listed = {obj["Key"]: obj["ETag"] for obj in self._list()}
        except (bce.ClientError, bce.BotoCoreError) as e:
            raise StoreError(f"listing adapter name documents under {self._root} failed: {e}") from e
        updated: dict[tuple[str, str], Doc] = {}
        invalid: dict[str, str] = {}
        for key, etag in listed.items():
            if self._seen.get(key) == etag:
                continue
            try:
                got = self._get(key)
                if got is not None and (got[0].get("owner"), got[0].get("name")) != _owner_name(self._root, key):
                    raise BadNameDocument(f"{key} is about another adapter than its key names")
            except BadNameDocument as e:  # one bad object must not stop every other adapter's changes
                invalid[key] = str(e)
                continue
            if got is None:  # deleted between the LIST and the GET: the next call reports it removed
                continue
            doc, etag = got
            updated[doc["owner"], doc["name"]] = doc
            listed[key] = etag
        removed = frozenset(_owner_name(self._root, k) for k in self._seen.keys() - listed.keys())
        self._seen = listed
        return NameChanges(updated=updated, removed=removed, invalid=invalid)

    # --- writes -------------------------------------------------------------------------------------------

    def update(self, owner: str, name: str, change: Callable[[Doc | None], Doc | None]) -> Doc | None:
        """Apply `change` (document or None -> new document, or None to delete) atomically; returns the result.

        `change` may run several times (once per conflicting write by another replica): keep it pure, and
        raise from it to refuse the change."""
        key = self._key(owner, name)
        for _ in range(self._attempts):
            got = self._get(key)
            doc, etag = got if got is not None else (None, None)
            new = change(json.loads(json.dumps(doc)) if doc is not None else None)  # change sees a copy
            try:
                if new is None:
                    if etag is not None:
                        self._s3.delete_object(Bucket=self._bucket, Key=key, IfMatch=etag)
                    return None
                _check_doc(new, owner, name)
                condition = {"IfMatch": etag} if etag is not None else {"IfNoneMatch": "*"}
                self._s3.put_object(Bucket=self._bucket, Key=key, Body=json.dumps(new, sort_keys=True).encode(),
                                    ContentType="application/json", **condition)
                return new
            except bce.ClientError as e:
                status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                if status not in (409, 412) and e.response.get("Error", {}).get("Code") != "PreconditionFailed":
                    raise StoreError(f"writing adapter name {owner}/{name} failed: {e}") from e
            except bce.BotoCoreError as e:
                raise StoreError(f"writing adapter name {owner}/{name} failed: {e}") from e
        raise NameConflict(f"adapter name {owner}/{name} changed under {self._attempts} attempts in a row; retry")

    def add_version(self, owner: str, name: str, version: Doc, *, promote: bool = True, by: str = "") -> Doc:
        """Record a version (fields of _VERSION_KEYS but seq) under the name, creating it on its first version;
        the first version is always current. Re-adding a version it has keeps its number."""
        vid = version["version_id"]

        def change(doc: Doc | None) -> Doc:
            now = self._clock()
            if doc is None:
                doc = {"format": NAME_FORMAT, "owner": owner, "name": name, "created_at": now, "public": False,
                       "shares": [], "current": vid, "next_seq": 1, "versions": [], "history": []}
                first = True
            else:
                first = False
            if all(v["version_id"] != vid for v in doc["versions"]):
                doc["versions"].append({**{k: version[k] for k in _VERSION_KEYS if k != "seq"},
                                        "seq": doc["next_seq"]})
                doc["next_seq"] += 1
            if first or promote:
                _repoint(doc, vid, now, by)
            return doc

        result = self.update(owner, name, change)
        assert result is not None
        return result

    def promote(self, owner: str, name: str, version_id: str, *, by: str = "") -> Doc:
        """Point the name at one of its versions; LookupError if the name or the version is not there."""

        def change(doc: Doc | None) -> Doc:
            if doc is None:
                raise LookupError(f"adapter {owner}/{name} not found")
            if all(v["version_id"] != version_id for v in doc["versions"]):
                raise LookupError(f"adapter {owner}/{name} has no version {version_id}")
            _repoint(doc, version_id, self._clock(), by)
            return doc

        result = self.update(owner, name, change)
        assert result is not None
        return result

    def share(self, owner: str, name: str, tenants: Iterable[str] | None, *, grant: bool) -> Doc:
        """Grant (or revoke) `tenants`, or with None make the adapter public (or not); LookupError if missing."""
        names = set(tenants) if tenants is not None else None

        def change(doc: Doc | None) -> Doc:
            if doc is None:
                raise LookupError(f"adapter {owner}/{name} not found")
            if names is None:
                doc["public"] = grant
            else:
                kept = set(doc["shares"]) | (names - {owner}) if grant else set(doc["shares"]) - names
                doc["shares"] = sorted(kept)
            return doc

        result = self.update(owner, name, change)
        assert result is not None
        return result

    def remove_version(self, owner: str, name: str, version_id: str) -> Doc:
        """Drop one version that is not current; LookupError if missing, VersionIsCurrent if current."""

        def change(doc: Doc | None) -> Doc:
            if doc is None or all(v["version_id"] != version_id for v in doc["versions"]):
                raise LookupError(f"adapter {owner}/{name} has no version {version_id}")
            if doc["current"] == version_id:
                raise VersionIsCurrent(f"version {version_id} became the current version of adapter {owner}/{name} "
                                       f"meanwhile: promote another version first, or delete the whole adapter")
            doc["versions"] = [v for v in doc["versions"] if v["version_id"] != version_id]
            return doc

        result = self.update(owner, name, change)
        assert result is not None
        return result

    def remove(self, owner: str, name: str, check: Callable[[Doc], None] | None = None) -> Doc | None:
        """Delete the document; returns the one deleted (None if there was none). `check(doc)` may refuse by
        raising; it runs on the document as it is right before the delete."""
        seen: list[Doc | None] = []

        def change(doc: Doc | None) -> None:
            if doc is not None and check is not None:
                check(doc)
            seen.append(doc)

        self.update(owner, name, change)
        return seen[-1]

    def delete(self, owner: str, name: str) -> bool:
        return self.remove(owner, name) is not None

    # --- helpers ------------------------------------------------------------------------------------------

    def _get(self, key: str) -> tuple[Doc, str] | None:
        try:
            resp = self._s3.get_object(Bucket=self._bucket, Key=key)
            body = resp["Body"].read()
        except bce.ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise StoreError(f"reading adapter name document {key} failed: {e}") from e
        except bce.BotoCoreError as e:
            raise StoreError(f"reading adapter name document {key} failed: {e}") from e
        try:
            doc = json.loads(body)
        except ValueError as e:
            raise BadNameDocument(f"{key} is not an adapter name document: {e}") from e
        if not isinstance(doc, dict) or doc.get("format") != NAME_FORMAT:
            raise BadNameDocument(f"{key} is not an adapter name document ({NAME_FORMAT})")
        return doc, resp["ETag"]

    def _list(self) -> Iterator[dict[str, Any]]:
        pages = self._s3.get_paginator("list_objects_v2").paginate(Bucket=self._bucket, Prefix=self._root)
        for page in pages:
            for obj in page.get("Contents", ()):
                if obj["Key"].endswith(".json"):
                    yield obj


def _repoint(doc: Doc, version_id: str, at: float, by: str) -> None:
    doc["current"] = version_id
    doc["history"] = (doc["history"] + [{"at": at, "current": version_id, "by": by}])[-HISTORY_LEN:]


def _check_doc(doc: Doc, owner: str, name: str) -> None:
    """A document about to be written names its own adapter and a current version it has."""
    ids = [v["version_id"] for v in doc["versions"]]
    if (doc.get("format") != NAME_FORMAT or (doc.get("owner"), doc.get("name")) != (owner, name)
            or doc.get("current") not in ids or len(set(ids)) != len(ids)
            or not all(VERSION_ID_RE.fullmatch(v) for v in ids)):
        raise ValueError(f"refusing to write an inconsistent name document for {owner}/{name}")


def _owner_name(root: str, key: str) -> tuple[str, str]:
    owner, _, file = key[len(root):].partition("/")
    return owner, file.removesuffix(".json")
