"""Replicas on one bucket, in one process: two ReplicatedRegistry copies, each with its own SQLite file and S3
client. Writes go through the name documents; the other copy sees them after a refresh pass."""

from __future__ import annotations

import json
import threading
import time

import pytest

from adapters.registry import (
    LOCAL_OWNER,
    AdapterInUse,
    AdapterNotFound,
    AdapterPermissionDenied,
    AdapterRegistry,
    AdapterVersion,
    InvalidRegistryArgument,
    VersionFilesMissing,
    VersionIsCurrent,
    VersionMeta,
)
from adapters.replica_sync import ReplicatedRegistry
from adapters.s3_names import NameBoard
from adapters.s3_store import S3Settings, S3Store

PREFIX = "loraserve/test"
FILES = {"adapter_config.json": b"{}", "adapter_model.safetensors": b"weights"}


def vid(i: int) -> str:
    return f"v-{i:024x}"


def meta(description: str = "") -> VersionMeta:
    return VersionMeta(size_bytes=10, rank=8, target_modules=("q_proj",), base_model_id="tiny",
                       description=description)


@pytest.fixture
def open_replica(s3_server, bucket, tmp_path):
    """Open a replica (own S3 client, own SQLite file); its refresh thread is not started unless asked."""
    made = []

    def open_(i: int, **kw) -> ReplicatedRegistry:
        store = S3Store(S3Settings(bucket=bucket, prefix=PREFIX, endpoint_url=s3_server.url))
        reg = ReplicatedRegistry(tmp_path / f"registry-{i}.db", store=store, **kw)
        made.append(reg)
        return reg

    yield open_
    for reg in made:
        reg.close()


def put(reg: ReplicatedRegistry, *ids: int) -> None:
    for i in ids:
        reg._store.put(vid(i), {**FILES, "adapter_model.safetensors": b"w%d" % i})


def test_writes_on_one_replica_are_seen_by_the_other_after_a_pass(open_replica):
    a, b = open_replica(0), open_replica(1)
    put(a, 1, 2)
    reg = a.register_version("acme", "bot", vid(1), meta("first"))
    assert reg.created and reg.current and reg.version.number == 1
    assert a.resolve("acme", "bot").version_id == vid(1)  # the writer serves it at once
    with pytest.raises(AdapterNotFound):
        b.resolve("acme", "bot")
    assert b.sync() == 1
    assert b.resolve("acme", "bot") == a.resolve("acme", "bot")

    second = b.register_version("acme", "bot", vid(2), meta(), promote=False)  # written through the other
    assert second.version.number == 2 and not second.current
    a.sync()
    assert a.resolve("acme", "bot@2").version_id == vid(2) and a.resolve("acme", "bot").version_id == vid(1)
    assert a.promote("acme", "bot", "2").version_id == vid(2)
    b.sync()
    assert b.resolve("acme", "bot").version_id == vid(2)

    info = b.share("acme", "bot", ["beta"])
    assert info.visibility == "shared" and info.shared_with == ("beta",)
    a.sync()
    assert a.resolve("beta", "acme/bot").version_id == vid(2)
    b.unshare("acme", "bot", ["beta"])
    b.share("acme", "bot", "*")
    a.sync()
    assert a.get("acme", "bot").visibility == "public" and a.get("acme", "bot").shared_with == ()

    assert a.delete_version("acme", "bot", "1") == (vid(1),)
    b.sync()
    assert [v.number for v in b.get("acme", "bot").versions] == [2]
    assert b.delete_adapter("acme", "bot") == (vid(2),)
    a.sync()
    with pytest.raises(AdapterNotFound):
        a.resolve("acme", "bot")
    assert a._store.list_ids() == []  # the deleting replica removed the files of both versions


def test_checks_run_on_the_fresh_document(open_replica):
    """A replica that has not refreshed yet still checks owner and versions against the bucket."""
    a, b = open_replica(0), open_replica(1)
    put(a, 1, 2)
    a.register_version("acme", "bot", vid(1), meta())
    a.register_version("acme", "bot", vid(2), meta(), promote=False)
    assert b.promote("acme", "bot", "2").number == 2  # b had never seen acme/bot
    with pytest.raises(AdapterNotFound):
        b.promote("beta", "acme/bot", "1")  # private: it looks missing
    a.share("acme", "bot", ["beta"])
    with pytest.raises(AdapterPermissionDenied):
        b.promote("beta", "acme/bot", "1")  # visible now, but not beta's
    with pytest.raises(VersionIsCurrent):
        b.delete_version("acme", "bot", "2")  # current since b's promote
    with pytest.raises(AdapterNotFound, match="no version '7'"):
        b.promote("acme", "bot", "7")
    a.delete_adapter("acme", "bot")
    with pytest.raises(AdapterNotFound):
        b.promote("acme", "bot", "1")  # b still had it in SQLite: the fresh read says it is gone
    assert b.adapter_keys() == frozenset()


def test_an_admin_names_another_tenants_adapter_with_its_owner(open_replica):
    a, b = open_replica(0), open_replica(1)
    put(a, 1, 2)
    a.register_version("acme", "bot", vid(1), meta())
    a.register_version("acme", "bot", vid(2), meta(), promote=False)
    b.sync()
    a.promote("acme", "bot", "2")
    with pytest.raises(AdapterNotFound, match="acme/bot"):  # a bare name is the admin's own or the service's
        b.promote("ops", "bot", "1", admin=True)
    assert b.promote("ops", "acme/bot", "1", admin=True).version_id == vid(1)
    a.sync()
    assert a.resolve("acme", "bot").version_id == vid(1)


def test_a_bare_name_in_a_write_means_the_same_on_every_replica(open_replica):
    """Own adapter, else the service's (`local`), each read fresh from the bucket before a change: a replica
    that has not refreshed picks the adapter a single server would."""
    a, b = open_replica(0), open_replica(1)
    put(a, 1, 2, 3)
    a.register_version(LOCAL_OWNER, "bot", vid(1), meta())
    a.share(LOCAL_OWNER, "bot", "*")
    a.register_version("beta", "bot", vid(2), meta())
    a.share("beta", "bot", "*")  # another tenant's public adapter of the same name: never a bare `bot`
    with pytest.raises(AdapterPermissionDenied, match="tenant 'local'"):  # b had never seen either
        b.delete_adapter("acme", "bot")
    assert b.share("ops", "bot", ["acme"], admin=True).owner == LOCAL_OWNER
    a.register_version("acme", "bot", vid(3), meta())
    assert b.resolve("acme", "bot").version_id == vid(1)  # reads: b's copy, until its next pass
    assert b.delete_adapter("acme", "bot") == (vid(3),)  # the fresh read finds acme's own first
    assert b.resolve("acme", "bot").version_id == vid(1)
    assert b.resolve("acme", "beta/bot").version_id == vid(2)


def test_a_version_named_by_another_replicas_adapter_keeps_its_files(open_replica):
    a, b = open_replica(0), open_replica(1)
    put(a, 1)
    a.register_version("acme", "bot", vid(1), meta())
    b.register_version("beta", "copy", vid(1), meta())  # same content, another adapter; a has not refreshed
    assert a.delete_adapter("acme", "bot") == ()  # a catches up before deleting files: beta/copy names it
    assert a._store.exists(vid(1)) and b.resolve("beta", "copy").version_id == vid(1)
    assert b.delete_adapter("beta", "copy") == (vid(1),) and not a._store.exists(vid(1))


def test_refusals_leave_the_document_unchanged(open_replica):
    a, b = open_replica(0), open_replica(1)
    with pytest.raises(VersionFilesMissing):
        a.register_version("acme", "bot", vid(1), meta())
    put(a, 1, 2)
    a.register_version("acme", "bot", vid(1), meta())
    a.register_version("acme", "bot", vid(2), meta(), promote=False)
    with pytest.raises(AdapterInUse):
        b.delete_adapter("acme", "bot", in_use=lambda v: v == vid(2))
    with pytest.raises(AdapterInUse):
        b.delete_version("acme", "bot", "2", in_use=lambda v: True)
    with pytest.raises(InvalidRegistryArgument):
        b.share("acme", "bot", "beta")
    board = NameBoard.for_store(a._store)
    doc = board.read("acme", "bot")
    assert [v["seq"] for v in doc["versions"]] == [1, 2] and doc["shares"] == [] and doc["current"] == vid(1)


def test_identical_reupload_is_not_created_again(open_replica):
    a, b = open_replica(0), open_replica(1)
    put(a, 1, 2)
    a.register_version("acme", "bot", vid(1), meta())
    a.register_version("acme", "bot", vid(2), meta())
    again = b.register_version("acme", "bot", vid(1), meta())
    assert not again.created and again.current and again.version.number == 1


def test_opening_drops_what_the_bucket_does_not_have(open_replica, tmp_path):
    local = AdapterRegistry(tmp_path / "registry-0.db")  # an earlier run's SQLite, never in the bucket
    local.register_version("acme", "stale", vid(9), meta())
    local.close()
    b = open_replica(1)
    put(b, 1)
    b.register_version("acme", "bot", vid(1), meta())
    a = open_replica(0)
    assert a.adapter_keys() == frozenset({("acme", "bot")})


def test_bad_objects_among_the_documents_are_skipped(open_replica, s3_server, bucket):
    """One bad object under names/ never stops the other adapters' changes."""
    a, b = open_replica(0), open_replica(1)
    put(a, 1)
    a.register_version("acme", "bot", vid(1), meta())
    doc = NameBoard.for_store(a._store).read("acme", "bot")
    bad = {"other": {**doc, "name": "other", "next_seq": 1},  # numbers at or past next_seq: inconsistent
           "fake": {**doc, "current": vid(1)},  # says it is acme/bot, at another adapter's key
           "junk": "not json {"}
    for name, body in bad.items():
        s3_server.client().put_object(Bucket=bucket, Key=f"{PREFIX}/names/acme/{name}.json",
                                      Body=body.encode() if isinstance(body, str) else json.dumps(body).encode())
    feed = NameBoard.for_store(b._store).changes()
    assert sorted(feed.invalid) == [f"{PREFIX}/names/acme/{n}.json" for n in ("fake", "junk")]
    assert b.sync() == 1
    assert b.adapter_keys() == frozenset({("acme", "bot")})
    a.promote("acme", "bot", "1")
    assert b.sync() == 1  # the bad objects are not read again until they change


def test_replace_adapter_keeps_numbers_and_refuses_inconsistent_rows(tmp_path):
    reg = AdapterRegistry(tmp_path / "r.db")

    def version(i: int, n: int) -> AdapterVersion:
        return AdapterVersion(owner="acme", name="bot", version_id=vid(i), number=n, created_at=1.0, description="",
                              size_bytes=1, rank=4, target_modules=("v_proj", "q_proj"), base_model_id="tiny")

    reg.replace_adapter("acme", "bot", created_at=1.0, public=False, shares=["beta", "acme"], current=vid(2),
                        next_seq=6, versions=[version(1, 3), version(2, 5)])
    info = reg.get("acme", "bot")
    assert [(v.version_id, v.number) for v in info.versions] == [(vid(1), 3), (vid(2), 5)]
    assert info.current.version_id == vid(2) and info.shared_with == ("beta",)
    assert reg.resolve("acme", "bot@3").target_modules == ("q_proj", "v_proj")
    dropped = reg.replace_adapter("acme", "bot", created_at=1.0, public=True, shares=[], current=vid(1),
                                  next_seq=6, versions=[version(1, 3)])
    assert dropped == (vid(2),) and reg.get("beta", "acme/bot").visibility == "public"
    for bad in (dict(current=vid(7)), dict(next_seq=3), dict(versions=[version(1, 3), version(1, 4)])):
        args = dict(created_at=1.0, public=False, shares=[], current=vid(1), next_seq=6, versions=[version(1, 3)])
        with pytest.raises(InvalidRegistryArgument):
            reg.replace_adapter("acme", "bot", **{**args, **bad})
    assert reg.resolve("acme", "bot").number == 3  # refused writes changed nothing
    assert reg.remove_adapters([("acme", "bot"), ("acme", "none")]) == 1 and reg.adapter_keys() == frozenset()
    reg.close()


def test_the_refresh_thread_brings_changes_within_the_bound(open_replica):
    a, b = open_replica(0), open_replica(1, refresh_s=0.2).start()
    put(a, 1, 2)
    a.register_version("acme", "bot", vid(1), meta())
    a.register_version("acme", "bot", vid(2), meta(), promote=False)
    t0 = time.monotonic()
    a.promote("acme", "bot", "2")
    while True:
        try:
            if b.resolve("acme", "bot").version_id == vid(2):
                break
        except AdapterNotFound:
            pass
        assert time.monotonic() - t0 < 0.2 + 2.0, "not seen within refresh_s + one pass"
        time.sleep(0.02)


def test_concurrent_writes_through_two_replicas_agree(open_replica):
    a, b = open_replica(0), open_replica(1)
    put(a, *range(1, 9))
    barrier = threading.Barrier(2)

    def register(reg, ids):
        barrier.wait()
        for i in ids:
            reg.register_version("acme", "bot", vid(i), meta(), promote=False)

    threads = [threading.Thread(target=register, args=(a, range(1, 5))),
               threading.Thread(target=register, args=(b, range(5, 9)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    a.sync()
    b.sync()
    numbers = [{v.version_id: v.number for v in r.get("acme", "bot").versions} for r in (a, b)]
    assert numbers[0] == numbers[1] and sorted(numbers[0].values()) == list(range(1, 9))
