"""Durable content store of adapter files, keyed by the server-made, content-derived version id.

Nothing a client sends becomes a path: the only key is a version id (`v-` + 24 lowercase hex chars, made by
`adapters.identity.adapter_version_id`), checked against a strict pattern before it touches the file
system, and the only file names are `adapter_config.json` and `adapter_model.safetensors`.

Layout of `FilesystemStore(root)`:

    root/v-0123456789abcdef01234567/adapter_config.json
                                   /adapter_model.safetensors
    root/.tmp-XXXXXXXX/        a put in progress (or one that died): never read, removed at open
    root/.trash-v-...-XXXXXXXX/ a delete in progress: renamed away first, so never read, removed at open

A put writes into a temp dir, fsyncs both files and the dir, renames the dir to its final name (atomic on
POSIX) and fsyncs root: a crash at any moment leaves the complete adapter or nothing. A delete renames the
dir out of the id namespace before removing it, so a reader sees the whole adapter or none of it.

One process owns a root (opening it removes the leftovers of dead puts, which would also remove a live
put of another process). Replicas share adapters through an S3-compatible bucket (adapters.s3_store), not
through one directory; `adapters.stores.open_store(kind, **settings)` opens either from the server config.

This module stays free of torch: a crash test runs it in a fresh subprocess.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol, runtime_checkable

from adapters.errors import quote

__all__ = [
    "CONFIG_FILE", "WEIGHTS_FILE", "FILE_NAMES", "VERSION_ID_RE", "FilesystemStore",
    "InvalidVersionId", "NotInStore", "Store", "StoreError", "check_files", "check_version_id",
]

# The same names as adapters.peft_format (which imports torch; this module must not).
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
FILE_NAMES = (CONFIG_FILE, WEIGHTS_FILE)
# adapters.identity: ID_PREFIX + ID_HEX_CHARS lowercase hex; a test pins the two together.
VERSION_ID_RE = re.compile(r"v-[0-9a-f]{24}")
_TMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".trash-"


class StoreError(Exception):
    """A store operation failed; the message names the version id and what is wrong."""


class InvalidVersionId(StoreError, ValueError):
    """A string that is not a server-made version id (and so never becomes a path)."""


class NotInStore(StoreError, LookupError):
    """The store holds no adapter under this version id."""


def check_version_id(version_id: object) -> str:
    """Return `version_id` if it is a well-formed version id, else raise InvalidVersionId."""
    if not isinstance(version_id, str) or VERSION_ID_RE.fullmatch(version_id) is None:
        raise InvalidVersionId(f"{quote(version_id)} is not an adapter version id (expected 'v-' and 24 lowercase hex chars)")
    return version_id


@runtime_checkable
class Store(Protocol):
    """Where adapter files live: `FilesystemStore` here, `adapters.s3_store.S3Store` in a bucket."""

    def put(self, version_id: str, files: Mapping[str, bytes]) -> bool:
        """Store the two adapter files atomically; False if the id was already stored (nothing written)."""
        ...

    def get(self, version_id: str) -> dict[str, bytes]:
        """{file name: bytes} of both files; NotInStore if absent."""
        ...

    def exists(self, version_id: str) -> bool: ...

    def delete(self, version_id: str) -> bool:
        """Remove the adapter; False if it was not there (so a retried cleanup succeeds)."""
        ...

    def list_ids(self) -> list[str]: ...

    def nbytes(self, version_id: str) -> int:
        """Total size of the stored files; NotInStore if absent."""
        ...


class FilesystemStore:
    """Adapter files under one local directory, written with temp dir + fsync + rename."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._remove_leftovers()

    def _remove_leftovers(self) -> None:
        """Remove temp dirs of puts and trash dirs of deletes that a crash interrupted."""
        for entry in self.root.iterdir():
            if entry.name.startswith((_TMP_PREFIX, _TRASH_PREFIX)):
                shutil.rmtree(entry, ignore_errors=True)

    def _dir(self, version_id: str) -> Path:
        return self.root / check_version_id(version_id)

    def put(self, version_id: str, files: Mapping[str, bytes]) -> bool:
        final = self._dir(version_id)
        blobs = check_files(files)
        if final.is_dir():
            # The id is content-derived: the stored files compute the same adapter, and stay immutable.
            return False
        tmp: Path | None = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=self.root))
        try:
            for name in FILE_NAMES:
                _write_file(tmp / name, blobs[name])
            _fsync_dir(tmp)
            try:
                os.rename(tmp, final)
            except OSError as e:
                # A concurrent put of the same id renamed first: its copy is as good as ours.
                if e.errno in (errno.EEXIST, errno.ENOTEMPTY) and final.is_dir():
                    return False
                raise
            tmp = None
            _fsync_dir(self.root)  # makes the rename itself durable
            return True
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)

    def get(self, version_id: str) -> dict[str, bytes]:
        d = self._dir(version_id)
        out: dict[str, bytes] = {}
        for name in FILE_NAMES:
            try:
                out[name] = (d / name).read_bytes()
            except FileNotFoundError:
                # A delete renamed the dir away mid-read: the adapter is gone, never half there.
                if d.is_dir():
                    raise StoreError(f"stored adapter {version_id} is missing {name}: the store was "
                                     f"modified outside loraserve") from None
                raise NotInStore(f"adapter version {version_id} is not in the store") from None
        return out

    def exists(self, version_id: str) -> bool:
        return self._dir(version_id).is_dir()

    def delete(self, version_id: str) -> bool:
        d = self._dir(version_id)
        trash = self.root / f"{_TRASH_PREFIX}{version_id}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(d, trash)
        except FileNotFoundError:
            return False
        _fsync_dir(self.root)  # the id is durably gone before the files are
        shutil.rmtree(trash, ignore_errors=True)
        return True

    def list_ids(self) -> list[str]:
        return sorted(e.name for e in self.root.iterdir() if VERSION_ID_RE.fullmatch(e.name) and e.is_dir())

    def nbytes(self, version_id: str) -> int:
        d = self._dir(version_id)
        try:
            return sum((d / name).stat().st_size for name in FILE_NAMES)
        except FileNotFoundError:
            raise NotInStore(f"adapter version {version_id} is not in the store") from None

    def __repr__(self) -> str:
        return f"FilesystemStore({str(self.root)!r})"


def check_files(files: Mapping[str, bytes]) -> dict[str, bytes]:
    """The two adapter files as bytes, or ValueError naming what is missing, unexpected or not bytes."""
    names = set(files)
    if names != set(FILE_NAMES):
        extra, missing = sorted(names - set(FILE_NAMES)), sorted(set(FILE_NAMES) - names)
        raise ValueError(f"an adapter is stored as exactly {' and '.join(FILE_NAMES)}; "
                         f"missing {missing or 'nothing'}, unexpected {extra or 'nothing'}")
    out = {}
    for name in FILE_NAMES:
        data = files[name]
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ValueError(f"{name} must be bytes, not {type(data).__name__}")
        out[name] = bytes(data)
    return out


def _write_file(path: Path, data: bytes) -> None:
    # "xb": the temp dir is ours alone, so an existing file means a bug, not something to overwrite.
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    """fsync a directory, so that the names created or renamed in it survive a power loss."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
