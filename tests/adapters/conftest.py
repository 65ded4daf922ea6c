"""Registries for the tests of this folder: `open_registry` opens empty ones on SQLite or PostgreSQL (the test's
parameter), `reg` one with a ticking clock."""

from __future__ import annotations

import pytest

from adapters.registry import AdapterRegistry
from tests.adapters.registry_helpers import Clock


@pytest.fixture(params=["sqlite", "postgresql"])
def open_registry(request, tmp_path):
    """open_registry(store=None, clock=None) -> a new empty registry on the backend of the test's parameter:
    SQLite (a file) or PostgreSQL (a database of its own on the session's cluster). Every test below runs on both."""
    opened = []

    def open_one(store=None, clock=None):
        kw = {"store": store, **({"clock": clock} if clock is not None else {})}
        if request.param == "sqlite":
            r = AdapterRegistry(tmp_path / f"registry-{len(opened)}.db", **kw)
        else:
            from adapters.pg import PgDatabase
            from adapters.pg_registry import PgAdapterRegistry

            db = PgDatabase(request.getfixturevalue("pg_cluster").new_database(), pool_size=4)
            opened.append(db)
            r = PgAdapterRegistry(db, replica=f"test-{len(opened)}", **kw)
        opened.append(r)
        return r

    yield open_one
    for thing in reversed(opened):
        thing.close()


@pytest.fixture
def reg(open_registry):
    return open_registry(clock=Clock())
