"""SqliteFile: a versioned schema, migrated forward in one transaction, newer files refused."""

from __future__ import annotations

import pytest

from adapters.sqlite_file import SqliteFile


class Broken(Exception):
    pass


V1 = "CREATE TABLE t (id TEXT PRIMARY KEY)"
MIGRATIONS = {1: "ALTER TABLE t ADD COLUMN note TEXT NOT NULL DEFAULT ''", 2: "CREATE INDEX t_note ON t (note)"}


def open_file(path, version: int, migrations=MIGRATIONS) -> SqliteFile:
    schema = V1 + ";" + ";".join(MIGRATIONS[v] for v in range(1, version))
    return SqliteFile(path, schema=schema, schema_version=version, what="test", error=Broken,
                      migrations=migrations)


def test_an_older_file_is_migrated_and_keeps_its_rows(tmp_path):
    path = tmp_path / "t.db"
    with open_file(path, 1) as f, f._txn() as db:
        db.execute("INSERT INTO t (id) VALUES ('a')")
    with open_file(path, 3) as f, f._txn(write=False) as db:
        assert db.execute("SELECT id, note FROM t").fetchall() == [("a", "")]
        assert db.execute("PRAGMA user_version").fetchone()[0] == 3
        assert ("t_note",) in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'").fetchall()


def test_a_newer_file_or_a_missing_step_is_refused(tmp_path):
    path = tmp_path / "t.db"
    open_file(path, 3).close()
    with pytest.raises(Broken, match="schema 3; this server reads schema 2 \\(written by a newer server\\)"):
        open_file(path, 2)
    old = tmp_path / "old.db"
    open_file(old, 1).close()
    with pytest.raises(Broken, match="schema 1; this server reads schema 3"):
        open_file(old, 3, migrations={2: MIGRATIONS[2]})  # no way from 1 to 2
