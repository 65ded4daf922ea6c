"""Open the adapter store the server config's `store` section describes (filesystem or S3-compatible).

Kept apart from `adapters.store`, so the base store never imports its S3 subclass (nor boto3).
"""

from __future__ import annotations

from adapters.store import FilesystemStore, Store

__all__ = ["STORE_KINDS", "open_store"]

STORE_KINDS = ("filesystem", "s3")


def open_store(kind: str, **settings: object) -> Store:
    """The store the config's `store` section describes: `filesystem` (path) or `s3` (adapters.s3_store)."""
    if kind == "filesystem":
        unknown = sorted(set(settings) - {"path"})
        if unknown or not settings.get("path"):
            raise ValueError(f"store kind 'filesystem' takes one setting, path (a directory); "
                             f"got {sorted(settings) or 'none'}")
        return FilesystemStore(str(settings["path"]))
    if kind == "s3":
        # Imported here: it imports boto3, which the filesystem store does not need.
        from adapters.s3_store import S3Settings, S3Store

        return S3Store(S3Settings.from_mapping(settings))
    raise ValueError(f"store kind {kind!r} is unknown: use one of {', '.join(STORE_KINDS)}")
