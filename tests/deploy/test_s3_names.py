"""Adapter name documents in the bucket: numbering, promote with history, no lost update when replicas write
at once, and the change feed a replica polls."""

from __future__ import annotations

import threading

import pytest

from adapters.registry_types import InvalidAdapterName
from adapters.s3_names import HISTORY_LEN, NameBoard, NameConflict
from adapters.s3_store import S3Settings, S3Store

PREFIX = "loraserve/test"


def vid(i: int) -> str:
    return f"v-{i:024x}"


def version(i: int) -> dict:
    return {"version_id": vid(i), "created_at": 1.0, "description": f"v{i}", "size_bytes": 100 + i, "rank": 8,
            "target_modules": ["q_proj", "v_proj"], "base_model_id": "smollm2-135m"}


@pytest.fixture
def boards(s3_server, bucket):
    """Two replicas' boards on one bucket, each with its own client, as two processes would have."""
    stores = [S3Store(S3Settings(bucket=bucket, prefix=PREFIX, endpoint_url=s3_server.url)) for _ in range(2)]
    return [NameBoard.for_store(s, clock=lambda: 1000.0) for s in stores]


def test_versions_are_numbered_and_promoted(s3_server, bucket, boards):
    a, b = boards
    doc = a.add_version("acme", "support-bot", version(1), by="acme")
    assert doc["current"] == vid(1) and [v["seq"] for v in doc["versions"]] == [1]
    doc = a.add_version("acme", "support-bot", version(2), promote=False)
    assert doc["current"] == vid(1) and [(v["version_id"], v["seq"]) for v in doc["versions"]] == [
        (vid(1), 1), (vid(2), 2)]
    assert a.add_version("acme", "support-bot", version(1), promote=False)["next_seq"] == 3  # keeps its number

    doc = b.promote("acme", "support-bot", vid(2), by="acme")  # another replica re-points it
    assert a.read("acme", "support-bot") == doc and doc["current"] == vid(2)
    assert [h["current"] for h in doc["history"]] == [vid(1), vid(2)]
    with pytest.raises(LookupError, match="has no version"):
        a.promote("acme", "support-bot", vid(9))
    with pytest.raises(LookupError, match="not found"):
        a.promote("acme", "other", vid(1))
    keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=bucket)["Contents"]]
    assert keys == [f"{PREFIX}/names/acme/support-bot.json"]

    assert b.delete("acme", "support-bot") is True and a.read("acme", "support-bot") is None
    assert b.delete("acme", "support-bot") is False


def test_history_is_bounded(boards):
    a, _ = boards
    a.add_version("acme", "bot", version(1))
    a.add_version("acme", "bot", version(2))
    for i in range(HISTORY_LEN + 5):
        doc = a.promote("acme", "bot", vid(1 + i % 2))
    assert len(doc["history"]) == HISTORY_LEN and doc["history"][-1]["current"] == doc["current"]


def test_concurrent_writers_lose_no_update(boards):
    """Two replicas add versions to one name at once: every version lands, numbered 1..N without gaps."""
    barrier = threading.Barrier(2)

    def add(board, ids):
        barrier.wait()
        for i in ids:
            board.add_version("acme", "bot", version(i), promote=False)

    threads = [threading.Thread(target=add, args=(boards[0], range(1, 7))),
               threading.Thread(target=add, args=(boards[1], range(7, 13)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    doc = boards[0].read("acme", "bot")
    assert sorted(v["version_id"] for v in doc["versions"]) == [vid(i) for i in range(1, 13)]
    assert sorted(v["seq"] for v in doc["versions"]) == list(range(1, 13)) and doc["next_seq"] == 13


def test_a_write_between_read_and_put_is_not_overwritten(boards):
    a, b = boards
    a.add_version("acme", "bot", version(1))
    calls = []

    def change(doc):
        calls.append(doc["next_seq"])
        if len(calls) == 1:  # another replica writes after our read, before our conditional put
            b.add_version("acme", "bot", version(2), promote=False)
        doc["public"] = True
        return doc

    doc = a.update("acme", "bot", change)
    assert calls == [2, 3]  # the first put failed its If-Match; the change ran again on the fresh document
    assert doc["public"] is True and [v["version_id"] for v in doc["versions"]] == [vid(1), vid(2)]
    assert b.read("acme", "bot") == doc


def test_endless_conflicts_give_up_with_a_clear_error(s3_server, bucket):
    store = S3Store(S3Settings(bucket=bucket, prefix=PREFIX, endpoint_url=s3_server.url))
    a, b = NameBoard.for_store(store, attempts=3), NameBoard.for_store(store)
    a.add_version("acme", "bot", version(1))
    a.add_version("acme", "bot", version(2))

    def change(doc):
        b.promote("acme", "bot", vid(1 if doc["current"] == vid(2) else 2))  # always someone in between
        return doc

    with pytest.raises(NameConflict, match="acme/bot changed under 3 attempts"):
        a.update("acme", "bot", change)


def test_change_feed(boards):
    a, b = boards
    a.add_version("acme", "bot", version(1))
    a.add_version("beta", "summarizer", version(2))
    first = b.changes()
    assert sorted(first.updated) == [("acme", "bot"), ("beta", "summarizer")] and first.removed == frozenset()
    assert b.changes().updated == {}  # nothing changed: one LIST, no GET

    a.add_version("acme", "bot", version(3))  # promoted by default
    a.delete("beta", "summarizer")
    feed = b.changes()
    assert list(feed.updated) == [("acme", "bot")] and feed.updated["acme", "bot"]["current"] == vid(3)
    assert feed.removed == frozenset({("beta", "summarizer")})
    assert b.changes().updated == {} and b.changes().removed == frozenset()


def test_names_never_become_arbitrary_keys(boards):
    a, _ = boards
    for owner, name in (("acme", "../x"), ("acme", "A"), ("../acme", "bot"), ("acme/x", "bot")):
        with pytest.raises((InvalidAdapterName, ValueError)):
            a.add_version(owner, name, version(1))


def test_inconsistent_documents_are_refused(boards):
    a, _ = boards
    a.add_version("acme", "bot", version(1))
    with pytest.raises(ValueError, match="inconsistent name document"):
        a.update("acme", "bot", lambda doc: {**doc, "current": vid(5)})
    assert a.read("acme", "bot")["current"] == vid(1)
