"""AdapterRegistry: names, versions, promotion and rollback, paging, deletes, durability (visibility:
test_registry_visibility.py)."""

from __future__ import annotations

import threading

import pytest

from adapters.registry import (
    AdapterExists,
    AdapterInUse,
    AdapterNotFound,
    AdapterRef,
    AdapterRegistry,
    InvalidAdapterName,
    InvalidPageToken,
    InvalidRegistryArgument,
    RegistryError,
    VersionFilesMissing,
    VersionIsCurrent,
    check_name,
)
from adapters.store import CONFIG_FILE, WEIGHTS_FILE, FilesystemStore
from tests.adapters.registry_helpers import BASE, meta, vid

# --- names -------------------------------------------------------------------------------------------------

BAD_NAMES = ["../x", "a/b", "A", "Abc", "", "a" * 64, "..", "a..b", ".x", "-x", "_x", "x\n", "x y", "x@1", "é",
             "x\x00", None, 5]


@pytest.mark.parametrize("bad", BAD_NAMES, ids=repr)
def test_bad_names_are_refused(reg, bad):
    with pytest.raises(InvalidAdapterName, match="not a valid adapter name|not an adapter reference"):
        reg.register_version("alice", bad, vid(1), meta())
    assert reg.list("alice", admin=True).adapters == ()


@pytest.mark.parametrize("good", ["a", "0", "a" * 63, "my-adapter.v2_1", "x.y"])
def test_good_names(reg, good):
    assert check_name(good) == good
    assert reg.register_version("alice", good, vid(1), meta()).version.name == good


@pytest.mark.parametrize("bad", ["", "x@", "x@v-12", "x@0", "x@01", "x@-1", "x@latest", "x@1@2", "/x", "a b/x",
                                 "x/", "a/b/c", "x@" + "V-" + "0" * 24])
def test_bad_refs_are_invalid_arguments(reg, bad):
    with pytest.raises(InvalidAdapterName):
        reg.resolve("alice", bad)


def test_ref_parsing():
    assert AdapterRef.parse("x") == AdapterRef(None, "x", None)
    assert AdapterRef.parse(f"bob/x@{vid(3)}") == AdapterRef("bob", "x", vid(3))
    assert AdapterRef.parse("x@12") == AdapterRef(None, "x", "12")


# --- resolve, promote, rollback ----------------------------------------------------------------------------


def test_resolve_by_name_version_and_number(reg):
    r1 = reg.register_version("alice", "summarizer", vid(1), meta(description="first"))
    assert r1.created and r1.current and r1.version.number == 1
    r2 = reg.register_version("alice", "summarizer", vid(2), meta(rank=8))
    assert r2.created and r2.current and r2.version.number == 2

    assert reg.resolve("alice", "summarizer").version_id == vid(2)  # the current one
    assert reg.resolve("alice", f"summarizer@{vid(1)}").description == "first"
    assert reg.resolve("alice", "summarizer@1").version_id == vid(1)
    assert reg.resolve("alice", "alice/summarizer@2").rank == 8
    v = reg.resolve("alice", "summarizer")
    assert (v.owner, v.name, v.ref) == ("alice", "summarizer", f"alice/summarizer@{vid(2)}")
    assert v.target_modules == ("q_proj", "v_proj") and v.base_model_id == BASE and v.size_bytes == 8000

    for ref, message in [(f"summarizer@{vid(9)}", "has no version"), ("summarizer@3", "has no version"),
                         ("nothing", "not found"), (f"nothing@{vid(1)}", "not found")]:
        with pytest.raises(AdapterNotFound, match=message):
            reg.resolve("alice", ref)


def test_promote_and_rollback(reg):
    for n in (1, 2):
        reg.register_version("alice", "a", vid(n), meta())
    first = reg.resolve("alice", "a")
    assert first.version_id == vid(2)
    assert reg.promote("alice", "a", vid(1)).version_id == vid(1)  # rollback
    assert reg.resolve("alice", "a").version_id == vid(1)
    assert first.version_id == vid(2)  # what a running request resolved does not change
    assert reg.promote("alice", "a", "2").version_id == vid(2)  # by number
    assert reg.resolve("alice", "a").version_id == vid(2)

    r3 = reg.register_version("alice", "a", vid(3), meta(), promote=False)  # staged, not live
    assert r3.created and not r3.current and reg.resolve("alice", "a").version_id == vid(2)
    assert reg.get("alice", "a").num_versions == 3
    with pytest.raises(AdapterNotFound, match="has no version"):
        reg.promote("alice", "a", vid(7))


def test_repointed_name_resolves_to_another_version_id(reg):
    reg.register_version("alice", "a", vid(1), meta())
    before = reg.resolve("alice", "a").version_id
    reg.register_version("alice", "a", vid(2), meta())
    after = reg.resolve("alice", "a").version_id
    assert before != after and {before, after} == {vid(1), vid(2)}


def test_identical_reupload_is_deduplicated(reg):
    reg.register_version("alice", "a", vid(1), meta(description="original"))
    reg.register_version("alice", "a", vid(2), meta())
    again = reg.register_version("alice", "a", vid(1), meta(description="ignored"), promote=False)
    assert not again.created and again.version.number == 1 and again.version.description == "original"
    assert not again.current and reg.get("alice", "a").num_versions == 2
    promoted = reg.register_version("alice", "a", vid(1), meta())  # re-upload of an old one with promote
    assert not promoted.created and promoted.current and reg.resolve("alice", "a").version_id == vid(1)
    # The same content under another adapter, even another tenant's, is its own row.
    assert reg.register_version("bob", "a", vid(1), meta()).created


def test_a_version_id_is_immutable(reg):
    reg.register_version("alice", "a", vid(1), meta(rank=4))
    for other in (meta(rank=8), meta(base="another-base")):
        with pytest.raises(AdapterExists, match="immutable"):
            reg.register_version("bob", "b", vid(1), other)
    assert reg.list("bob").adapters == ()


def test_bad_metadata_and_ids_are_refused(reg):
    with pytest.raises(InvalidRegistryArgument, match="version id"):
        reg.register_version("alice", "a", "v-../../x", meta())
    with pytest.raises(InvalidRegistryArgument, match="description"):
        meta(description="x" * 5000)
    with pytest.raises(InvalidRegistryArgument, match="tenant"):
        reg.register_version("al/ice", "a", vid(1), meta())


# --- listing -----------------------------------------------------------------------------------------------


def test_listing_is_paged_and_stable(reg):
    names = [f"adapter-{i:02d}" for i in range(25)]
    for i, name in enumerate(names):
        reg.register_version("alice", name, vid(i + 1), meta())
    reg.register_version("bob", "hidden", vid(99), meta())

    page1 = reg.list("alice", page_size=10)
    assert [a.name for a in page1.adapters] == names[:10] and page1.next_page_token
    # Adapters added or removed between pages neither repeat nor skip the ones that stay.
    reg.register_version("alice", "adapter-00a", vid(100), meta())  # sorts into page 1: not shown again
    reg.delete_adapter("alice", "adapter-12")
    page2 = reg.list("alice", page_size=10, page_token=page1.next_page_token)
    page3 = reg.list("alice", page_size=10, page_token=page2.next_page_token)
    assert page3.next_page_token == ""
    later = [a.name for a in page2.adapters + page3.adapters]
    assert later == [n for n in names[10:] if n != "adapter-12"]
    assert page1.adapters[0].current.version_id == vid(1) and page1.adapters[0].num_versions == 1

    assert len(reg.list("alice").adapters) == 25  # page_size 0: the default (100)
    assert len(reg.list("alice", page_size=10**6).adapters) == 25  # coerced to the maximum
    with pytest.raises(InvalidRegistryArgument):
        reg.list("alice", page_size=-1)
    for token in ("garbage!", "e30", "W10"):  # not base64 json / {} / []
        with pytest.raises(InvalidPageToken):
            reg.list("alice", page_token=token)


# --- deletes -----------------------------------------------------------------------------------------------


def test_delete_refused_while_in_use_or_current(reg):
    for n in (1, 2, 3):
        reg.register_version("alice", "a", vid(n), meta())
    busy = {vid(1)}
    with pytest.raises(AdapterInUse, match="in use"):
        reg.delete_version("alice", "a", vid(1), in_use=busy.__contains__)
    with pytest.raises(VersionIsCurrent, match="promote another version first"):
        reg.delete_version("alice", "a", "3", in_use=busy.__contains__)
    with pytest.raises(AdapterInUse):
        reg.delete_adapter("alice", "a", in_use=busy.__contains__)
    assert reg.get("alice", "a").num_versions == 3  # nothing changed

    assert reg.delete_version("alice", "a", "2", in_use=busy.__contains__) == (vid(2),)
    with pytest.raises(AdapterNotFound):
        reg.resolve("alice", "a@2")
    assert reg.register_version("alice", "a", vid(4), meta()).version.number == 4  # numbers are never reused
    assert reg.register_version("alice", "a", vid(2), meta()).version.number == 5
    busy.clear()
    assert set(reg.delete_adapter("alice", "a", in_use=busy.__contains__)) == {vid(n) for n in (1, 2, 3, 4)}
    with pytest.raises(AdapterNotFound):
        reg.resolve("alice", "a")
    assert reg.referenced_version_ids() == frozenset()


def test_a_version_shared_by_two_adapters_is_released_with_the_last(reg):
    reg.register_version("alice", "a", vid(1), meta())
    reg.register_version("bob", "b", vid(1), meta())
    assert reg.delete_adapter("alice", "a") == ()  # bob's adapter still refers to it
    assert reg.delete_adapter("bob", "b") == (vid(1),)


def test_store_files_follow_the_registry(tmp_path, open_registry):
    store = FilesystemStore(tmp_path / "store")
    files = {CONFIG_FILE: b"{}", WEIGHTS_FILE: b"w"}
    with open_registry(store=store) as reg:
        with pytest.raises(VersionFilesMissing, match="not in the adapter store"):
            reg.register_version("alice", "a", vid(1), meta())
        for n in (1, 2):
            store.put(vid(n), files)
            reg.register_version("alice", "a", vid(n), meta())
        reg.register_version("bob", "b", vid(1), meta())
        store.put(vid(3), files)  # an upload that crashed before it registered
        reg.delete_version("alice", "a", vid(1))
        assert store.exists(vid(1))  # still bob's
        reg.delete_adapter("alice", "a")
        assert not store.exists(vid(2))
        if reg.path is None:  # shared by replicas: another may be between its put and its register
            assert reg.gc_store() == () and store.list_ids() == [vid(1), vid(3)]
        else:
            assert reg.gc_store() == (vid(3),)
            assert store.list_ids() == [vid(1)]


# --- durability and concurrency ----------------------------------------------------------------------------


def test_everything_survives_reopening(tmp_path):
    path = tmp_path / "registry.db"
    with AdapterRegistry(path) as reg:
        for n in (1, 2, 3):
            reg.register_version("alice", "a", vid(n), meta(description=f"v{n}"))
        reg.promote("alice", "a", "1")
        reg.delete_version("alice", "a", "3")
        reg.share("alice", "a", ["bob"])
        before = reg.get("alice", "a")
    with AdapterRegistry(path) as reg:
        assert reg.get("alice", "a") == before
        assert before.current.version_id == vid(1) and [v.number for v in before.versions] == [1, 2]
        assert reg.resolve("bob", "alice/a").version_id == vid(1)
        assert reg.register_version("alice", "a", vid(4), meta()).version.number == 4
        journal = reg._db.execute("PRAGMA journal_mode").fetchone()[0]
        assert journal == "wal"


def test_the_database_keeps_every_adapter_pointing_at_a_version(reg):
    import sqlite3

    import psycopg

    reg.register_version("alice", "a", vid(1), meta())
    with pytest.raises((sqlite3.IntegrityError, psycopg.errors.ForeignKeyViolation),
                       match="FOREIGN KEY|foreign key"), reg._txn() as db:
        db.execute("DELETE FROM versions WHERE version_id = ?", (vid(1),))  # bypassing the API's checks
    assert reg.resolve("alice", "a").version_id == vid(1)
    if reg.path is not None:
        assert not reg._db.in_transaction


def test_a_newer_schema_is_refused(tmp_path):
    path = tmp_path / "registry.db"
    with AdapterRegistry(path) as reg:
        reg._db.execute("PRAGMA user_version = 99")
    with pytest.raises(RegistryError, match="schema 99"):
        AdapterRegistry(path)


def test_concurrent_registrations_get_distinct_numbers(reg):
    def upload(t: int) -> None:
        for i in range(10):
            reg.register_version("alice", "a", vid(100 * t + i), meta())

    threads = [threading.Thread(target=upload, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    numbers = [v.number for v in reg.get("alice", "a").versions]
    assert numbers == list(range(1, 41))


def test_every_repointing_is_in_the_history(reg):
    reg.register_version("alice", "a", vid(1), meta())
    reg.register_version("alice", "a", vid(2), meta())  # promoted: current
    reg.register_version("alice", "a", vid(3), meta(), promote=False)  # not a re-pointing
    reg.register_version("alice", "a", vid(2), meta())  # already current: no re-pointing either
    reg.promote("alice", "a", "1")
    reg.promote("ops", "alice/a", vid(3), admin=True)
    hist = reg.history("alice", "a")
    assert [(h.seq, h.previous, h.current, h.by) for h in hist] == [
        (1, None, vid(1), "alice"), (2, vid(1), vid(2), "alice"), (3, vid(2), vid(1), "alice"),
        (4, vid(1), vid(3), "ops")]
    assert all(a.at < b.at for a, b in zip(hist, hist[1:]))
    with pytest.raises(AdapterNotFound):
        reg.history("bob", "alice/a")  # private: its history is as invisible as it is
