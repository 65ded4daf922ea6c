"""FilesystemStore: atomic puts (crash at any point: the whole adapter or nothing), ids that never become
paths, round trips and deletes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

import adapters.store as store_mod
from adapters.store import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    FilesystemStore,
    InvalidVersionId,
    NotInStore,
    Store,
    check_version_id,
)

REPO = Path(__file__).resolve().parents[2]
VID = "v-0123456789abcdef01234567"
VID2 = "v-" + "f" * 24
FILES = {CONFIG_FILE: b'{"peft_type": "LORA", "r": 4}', WEIGHTS_FILE: b"\x08\x00" + os.urandom(4096)}


def entries(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def test_round_trip_and_delete(tmp_path):
    store = FilesystemStore(tmp_path)
    assert isinstance(store, Store)
    assert not store.exists(VID) and store.list_ids() == []
    assert store.put(VID, FILES) is True
    assert store.exists(VID) and store.get(VID) == FILES
    assert store.nbytes(VID) == sum(len(b) for b in FILES.values())
    assert store.put(VID, {CONFIG_FILE: b"{}", WEIGHTS_FILE: b"other"}) is False  # immutable: first copy stays
    assert store.get(VID) == FILES
    store.put(VID2, FILES)
    assert store.list_ids() == [VID, VID2]
    assert entries(tmp_path) == [VID, VID2]  # no temp or trash left behind

    assert store.delete(VID) is True
    assert not store.exists(VID) and store.list_ids() == [VID2]
    assert entries(tmp_path) == [VID2]
    with pytest.raises(NotInStore, match=VID):
        store.get(VID)
    with pytest.raises(NotInStore):
        store.nbytes(VID)
    assert store.delete(VID) is False  # a retried cleanup succeeds
    assert FilesystemStore(tmp_path).get(VID2) == FILES  # durable across reopen


BAD_IDS = [
    "../x", "a/b", "", "..", "/etc/passwd", "v-" + "0" * 23, "v-" + "0" * 25, "V-" + "0" * 24, "v-" + "A" * 24,
    "v-" + "g" * 24, "v-" + "0" * 24 + "\n", "v-" + "0" * 21 + "/..", ".tmp-abc", "x-" + "0" * 24, None, 7,
]


@pytest.mark.parametrize("bad", BAD_IDS, ids=repr)
def test_ids_that_are_not_server_made_are_refused(tmp_path, bad):
    store = FilesystemStore(tmp_path / "store")
    for call in (lambda: store.put(bad, FILES), lambda: store.get(bad), lambda: store.exists(bad),
                 lambda: store.delete(bad), lambda: store.nbytes(bad)):
        with pytest.raises(InvalidVersionId, match="not an adapter version id"):
            call()
    assert entries(tmp_path) == ["store"] and entries(tmp_path / "store") == []


def test_check_version_id_accepts_server_ids():
    assert check_version_id(VID) == VID
    with pytest.raises(ValueError):  # InvalidVersionId is a ValueError: INVALID_ARGUMENT upstream
        check_version_id("v-../../etc")


@pytest.mark.parametrize("files, message", [
    ({CONFIG_FILE: b"{}"}, "missing"),
    ({**FILES, "model.bin": b"pickle"}, "unexpected"),
    ({**FILES, "../adapter_config.json": b"{}"}, "unexpected"),
    ({CONFIG_FILE: "text", WEIGHTS_FILE: b""}, "must be bytes"),
])
def test_only_the_two_adapter_files_are_stored(tmp_path, files, message):
    store = FilesystemStore(tmp_path)
    with pytest.raises(ValueError, match=message):
        store.put(VID, files)
    assert entries(tmp_path) == []


def test_exception_between_writes_leaves_nothing(tmp_path, monkeypatch):
    real_write = store_mod._write_file
    calls = []

    def failing_write(path, data):
        calls.append(path.name)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_write(path, data)

    monkeypatch.setattr(store_mod, "_write_file", failing_write)
    store = FilesystemStore(tmp_path)
    with pytest.raises(OSError, match="No space"):
        store.put(VID, FILES)
    assert calls == [CONFIG_FILE, WEIGHTS_FILE]
    assert not store.exists(VID) and store.list_ids() == [] and entries(tmp_path) == []  # temp dir removed


_CRASH_SCRIPT = textwrap.dedent("""
    import os, sys
    import adapters.store as s
    root, point, version_id = sys.argv[1:4]
    files = {s.CONFIG_FILE: b"{}", s.WEIGHTS_FILE: b"w" * 100000}
    real_write, real_rename, real_fsync_dir = s._write_file, os.rename, s._fsync_dir

    def die():
        os._exit(9)  # no finally blocks, no cleanup: as abrupt as a kill -9 or a power cut

    def write(path, data):
        if point == "mid_file":  # half of the first file is on disk
            with open(path, "xb") as f:
                f.write(data[: len(data) // 2])
            die()
        real_write(path, data)
        if point == "after_first_file":
            die()

    def rename(src, dst):
        if point == "before_rename":
            die()
        real_rename(src, dst)

    def fsync_dir(path):
        real_fsync_dir(path)
        if point == "after_rename" and str(path) == root:
            die()

    s._write_file, s.os.rename, s._fsync_dir = write, rename, fsync_dir
    s.FilesystemStore(root).put(version_id, files)
    sys.exit(0)
""")


@pytest.mark.parametrize("point", ["mid_file", "after_first_file", "before_rename", "after_rename"])
def test_crash_mid_put_leaves_whole_adapter_or_nothing(tmp_path, point):
    root = tmp_path / "store"
    root.mkdir()
    proc = subprocess.run([sys.executable, "-c", _CRASH_SCRIPT, str(root), point, VID], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 9, proc.stderr
    leftovers = entries(root)
    store = FilesystemStore(root)  # reopen after the "crash"
    if point == "after_rename":  # renamed: the adapter is complete, whatever happened next
        assert leftovers == [VID]
        assert store.list_ids() == [VID] and store.get(VID)[WEIGHTS_FILE] == b"w" * 100000
    else:
        assert len(leftovers) == 1 and leftovers[0].startswith(".tmp-")  # the dead put's temp dir
        assert not store.exists(VID) and store.list_ids() == []
        with pytest.raises(NotInStore):
            store.get(VID)
    assert entries(root) == store.list_ids()  # temp dirs cleaned at open


def test_interrupted_delete_is_finished_at_open(tmp_path):
    store = FilesystemStore(tmp_path)
    store.put(VID, FILES)
    os.rename(tmp_path / VID, tmp_path / f".trash-{VID}-0000")  # a delete that died after its rename
    assert not store.exists(VID) and store.list_ids() == []  # already invisible
    FilesystemStore(tmp_path)
    assert entries(tmp_path) == []


def test_concurrent_puts_of_one_id(tmp_path):
    store = FilesystemStore(tmp_path)
    barrier, results = threading.Barrier(4), []

    def put():
        barrier.wait()
        results.append(store.put(VID, FILES))

    threads = [threading.Thread(target=put) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 1 and results.count(False) == 3
    assert store.get(VID) == FILES and entries(tmp_path) == [VID]


def test_store_module_does_not_import_torch():
    # The crash test runs it in a fresh interpreter; it must stay cheap to start.
    code = "import sys, adapters.store; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                   check=True, timeout=60)
