"""S3Store against a real S3-compatible server on loopback: round trips, the manifest as commit point
(an interrupted or mismatching upload is never visible), concurrent puts, and clear errors at open."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading

import botocore.exceptions as bce
import pytest

from adapters.s3_store import MANIFEST_FILE, S3Settings, S3Store, StoreSetupError
from adapters.store import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    FilesystemStore,
    InvalidVersionId,
    NotInStore,
    Store,
    StoreError,
)
from adapters.stores import open_store

VID = "v-0123456789abcdef01234567"
VID2 = "v-" + "f" * 24
FILES = {CONFIG_FILE: b'{"peft_type": "LORA", "r": 4}', WEIGHTS_FILE: b"\x08\x00" + os.urandom(4096)}
PREFIX = "loraserve/test"


def make_store(s3_server, bucket: str, prefix: str = PREFIX, **kw) -> S3Store:
    return S3Store(S3Settings(bucket=bucket, prefix=prefix, endpoint_url=s3_server.url, **kw))


def keys(s3_server, bucket: str) -> list[str]:
    resp = s3_server.client().list_objects_v2(Bucket=bucket)
    return sorted(o["Key"] for o in resp.get("Contents", ()))


def manifest_key(vid: str = VID) -> str:
    return f"{PREFIX}/versions/{vid}/{MANIFEST_FILE}"


def read_manifest(s3_server, bucket: str, vid: str = VID) -> dict:
    return json.loads(s3_server.client().get_object(Bucket=bucket, Key=manifest_key(vid))["Body"].read())


def test_round_trip_list_and_delete(s3_server, bucket):
    store = make_store(s3_server, bucket)
    assert isinstance(store, Store)
    assert not store.exists(VID) and store.list_ids() == []
    assert store.put(VID, FILES) is True
    assert store.exists(VID) and store.get(VID) == FILES
    assert store.nbytes(VID) == sum(len(b) for b in FILES.values())
    assert store.put(VID, {CONFIG_FILE: b"{}", WEIGHTS_FILE: b"other"}) is False  # immutable: first copy stays
    assert store.get(VID) == FILES

    m = read_manifest(s3_server, bucket)
    upload = m["upload"]
    assert m["version_id"] == VID and m["files"][WEIGHTS_FILE] == {
        "size": len(FILES[WEIGHTS_FILE]), "sha256": hashlib.sha256(FILES[WEIGHTS_FILE]).hexdigest()}
    assert keys(s3_server, bucket) == [manifest_key(), f"{PREFIX}/versions/{VID}/{upload}/{CONFIG_FILE}",
                                       f"{PREFIX}/versions/{VID}/{upload}/{WEIGHTS_FILE}"]

    store.put(VID2, FILES)
    assert store.list_ids() == [VID, VID2]
    assert make_store(s3_server, bucket).list_ids() == [VID, VID2]  # another replica sees the same
    assert make_store(s3_server, bucket, prefix="other").list_ids() == []  # prefixes do not mix

    assert store.delete(VID) is True
    assert not store.exists(VID) and store.list_ids() == [VID2]
    assert not any(k.startswith(f"{PREFIX}/versions/{VID}/") for k in keys(s3_server, bucket))
    with pytest.raises(NotInStore, match=VID):
        store.get(VID)
    with pytest.raises(NotInStore):
        store.nbytes(VID)
    assert store.delete(VID) is False  # a retried cleanup succeeds


def test_ids_that_are_not_server_made_are_refused(s3_server, bucket):
    store = make_store(s3_server, bucket)
    for bad in ("../x", "v-" + "0" * 23, "v-../../etc", "", None):
        with pytest.raises(InvalidVersionId, match="not an adapter version id"):
            store.put(bad, FILES)
        for method in (store.get, store.exists, store.delete, store.nbytes):
            with pytest.raises(InvalidVersionId, match="not an adapter version id"):
                method(bad)
    with pytest.raises(ValueError, match="unexpected"):
        store.put(VID, {**FILES, "model.bin": b"pickle"})
    assert keys(s3_server, bucket) == []


def test_files_without_manifest_are_invisible_and_collected(s3_server, bucket):
    """A put that died after its files (no manifest) leaves no visible version; a later put succeeds."""
    raw = s3_server.client()
    dead = "u-00000000deadbeef"
    for name, data in FILES.items():
        raw.put_object(Bucket=bucket, Key=f"{PREFIX}/versions/{VID}/{dead}/{name}", Body=data)
    store = make_store(s3_server, bucket)
    assert not store.exists(VID) and store.list_ids() == []
    with pytest.raises(NotInStore, match="not in the store"):
        store.get(VID)
    assert store.delete(VID) is False

    raw.put_object(Bucket=bucket, Key=f"{PREFIX}/versions/{VID}/{dead}/{WEIGHTS_FILE}", Body=FILES[WEIGHTS_FILE])
    assert store.put(VID, FILES) is True and store.get(VID) == FILES
    live = read_manifest(s3_server, bucket)["upload"]
    assert store.remove_leftovers(older_than_s=3600) == []  # too young: might be another replica's live put
    removed = store.remove_leftovers(older_than_s=-1)
    assert removed == [f"{VID}/{dead}/{WEIGHTS_FILE}"]
    assert all(dead not in k for k in keys(s3_server, bucket)) and store.get(VID) == FILES
    assert read_manifest(s3_server, bucket)["upload"] == live


@pytest.mark.parametrize("damage", ["size", "sha256", "missing_file", "not_json", "other_version"])
def test_manifest_that_does_not_match_its_files_is_invisible(s3_server, bucket, damage):
    store = make_store(s3_server, bucket)
    store.put(VID, FILES)
    raw = s3_server.client()
    m = read_manifest(s3_server, bucket)
    old_upload = m["upload"]
    if damage == "size":
        m["files"][WEIGHTS_FILE]["size"] += 1
    elif damage == "sha256":
        m["files"][CONFIG_FILE]["sha256"] = "0" * 64
    elif damage == "missing_file":
        raw.delete_object(Bucket=bucket, Key=f"{PREFIX}/versions/{VID}/{old_upload}/{WEIGHTS_FILE}")
    elif damage == "other_version":
        m["version_id"] = VID2
    body = b"{not json" if damage == "not_json" else json.dumps(m).encode()
    raw.put_object(Bucket=bucket, Key=manifest_key(), Body=body)

    assert not store.exists(VID) and store.list_ids() == []
    with pytest.raises(NotInStore, match=r"is not \(completely\) in the store"):
        store.get(VID)
    with pytest.raises(NotInStore):
        store.nbytes(VID)

    # A new put replaces the broken version (If-Match on the broken manifest); the files the broken manifest
    # named go with it, those of one that names none go with the collection of leftovers.
    assert store.put(VID, FILES) is True
    assert store.exists(VID) and store.get(VID) == FILES and store.list_ids() == [VID]
    assert read_manifest(s3_server, bucket)["upload"] != old_upload
    if damage in ("not_json", "other_version"):
        assert store.remove_leftovers(older_than_s=-1) == [f"{VID}/{old_upload}/{n}" for n in (CONFIG_FILE,
                                                                                                WEIGHTS_FILE)]
    assert not any(old_upload in k for k in keys(s3_server, bucket)) and len(keys(s3_server, bucket)) == 3


def test_bytes_changed_behind_the_manifest_are_refused_on_get(s3_server, bucket):
    """Same size and a copied sha256 metadata pass the cheap checks; get still hashes the bytes."""
    store = make_store(s3_server, bucket)
    store.put(VID, FILES)
    upload = read_manifest(s3_server, bucket)["upload"]
    key = f"{PREFIX}/versions/{VID}/{upload}/{WEIGHTS_FILE}"
    raw = s3_server.client()
    forged = bytes(len(FILES[WEIGHTS_FILE]))
    raw.put_object(Bucket=bucket, Key=key, Body=forged,
                   Metadata={"sha256": hashlib.sha256(FILES[WEIGHTS_FILE]).hexdigest()})
    with pytest.raises(NotInStore, match=f"{WEIGHTS_FILE} does not match its manifest"):
        store.get(VID)
    raw.put_object(Bucket=bucket, Key=key, Body=forged)  # without the metadata the cheap check sees it too
    assert not store.exists(VID)


def test_failure_between_uploads_leaves_nothing(s3_server, bucket, monkeypatch):
    store = make_store(s3_server, bucket)
    real_put, calls = store._s3.put_object, []

    def failing_put(**kw):
        calls.append(kw["Key"].rsplit("/", 1)[1])
        if len(calls) == 2:
            raise bce.ClientError({"Error": {"Code": "SlowDown", "Message": "Reduce your request rate"},
                                   "ResponseMetadata": {"HTTPStatusCode": 503}}, "PutObject")
        return real_put(**kw)

    monkeypatch.setattr(store._s3, "put_object", failing_put)
    with pytest.raises(StoreError, match=f"storing adapter version {VID} in bucket '{bucket}'.*SlowDown"):
        store.put(VID, FILES)
    assert calls == [CONFIG_FILE, WEIGHTS_FILE]  # the manifest was never written
    assert not store.exists(VID) and keys(s3_server, bucket) == []  # the first file was removed again


def test_delete_removes_the_manifest_first(s3_server, bucket, monkeypatch):
    store = make_store(s3_server, bucket)
    store.put(VID, FILES)

    def failing_delete_objects(**kw):
        raise bce.EndpointConnectionError(endpoint_url=s3_server.url)

    monkeypatch.setattr(store._s3, "delete_objects", failing_delete_objects)
    with pytest.raises(StoreError, match="deleting adapter version"):
        store.delete(VID)
    assert not store.exists(VID) and store.list_ids() == []  # files remain, but no version is visible
    assert manifest_key() not in keys(s3_server, bucket) and len(keys(s3_server, bucket)) == 2


def test_concurrent_puts_of_one_id_commit_one_complete_upload(s3_server, bucket):
    """Two replicas put the same version (other bytes, same content id) at once: one wins whole."""
    stores = [make_store(s3_server, bucket) for _ in range(2)]
    variants = [FILES, {CONFIG_FILE: FILES[CONFIG_FILE], WEIGHTS_FILE: b"\x08\x00" + os.urandom(4096)}]
    barrier, results = threading.Barrier(2), [None, None]

    def put(i):
        barrier.wait()
        results[i] = stores[i].put(VID, variants[i])

    threads = [threading.Thread(target=put, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False, True]
    winner = variants[results.index(True)]
    assert stores[0].get(VID) == winner and stores[1].get(VID) == winner
    assert len(keys(s3_server, bucket)) == 3  # the loser removed its upload


def test_open_store_builds_either_kind(s3_server, bucket, tmp_path):
    s3 = open_store("s3", bucket=bucket, prefix=PREFIX, endpoint_url=s3_server.url, region="us-east-1")
    fs = open_store("filesystem", path=str(tmp_path / "adapters"))
    assert isinstance(s3, S3Store) and isinstance(fs, FilesystemStore)
    for store in (s3, fs):
        assert store.put(VID, FILES) and store.get(VID) == FILES
    with pytest.raises(ValueError, match="store kind 'nfs' is unknown: use one of filesystem, s3"):
        open_store("nfs", path="/x")
    with pytest.raises(ValueError, match="takes one setting, path"):
        open_store("filesystem", path=str(tmp_path), bucket="x")
    with pytest.raises(ValueError, match=r"unknown s3 store setting\(s\) \['aws_secret_access_key'\]"):
        open_store("s3", bucket=bucket, aws_secret_access_key="x")


@pytest.mark.parametrize("settings, message", [
    ({"bucket": "UPPER"}, "not a valid bucket name"),
    ({"bucket": "ok-bucket", "prefix": "/abs"}, "prefix"),
    ({"bucket": "ok-bucket", "prefix": "a/../b"}, "prefix"),
    ({"bucket": "ok-bucket", "endpoint_url": "minio:9000"}, "endpoint_url"),
    ({"bucket": "ok-bucket", "max_attempts": 0}, "max_attempts"),
])
def test_bad_settings_are_refused_before_any_request(settings, message):
    with pytest.raises(ValueError, match=message):
        S3Settings(**settings)


# --- errors at open: each names the problem ------------------------------------------------------------------


def test_missing_credentials(s3_server, bucket, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(StoreSetupError, match="no S3 credentials found .*set AWS_ACCESS_KEY_ID"):
        make_store(s3_server, bucket)


def test_wrong_credentials(s3_server, bucket, iam_user, monkeypatch):
    key_id, secret = iam_user
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    store = make_store(s3_server, bucket)  # the right ones work while the server checks them
    assert store.put(VID, FILES) and store.get(VID) == FILES
    for key_id_, secret_ in ((key_id, "not-the-secret"), ("AKIAUNKNOWNUNKNOWN00", secret)):
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id_)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret_)
        with pytest.raises(StoreSetupError, match=f"access to bucket '{bucket}' .* was denied \\(HTTP 403\\): the "
                                                  f"credentials from 'env' are wrong"):
            make_store(s3_server, bucket)


def test_missing_bucket(s3_server, bucket):
    with pytest.raises(StoreSetupError, match="bucket 'no-such-bucket' at http://127.0.0.1:.* does not exist"):
        make_store(s3_server, "no-such-bucket")


def test_unreachable_endpoint():
    with socket.socket() as s:  # a loopback port nothing listens on: connections are refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(StoreSetupError, match=f"cannot reach the S3 endpoint for bucket 'adapters' at "
                                              f"http://127.0.0.1:{port}"):
        S3Store(S3Settings(bucket="adapters", endpoint_url=f"http://127.0.0.1:{port}", max_attempts=1))
