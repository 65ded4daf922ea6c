"""database.url and its flag, environment variable and config keys: checked before anything loads, with messages
that never show a password; `sqlite:///DIR` puts the registry and ledger in DIR; retired keys are named."""

from __future__ import annotations

import pytest
import yaml

from adapters.store import FilesystemStore
from service.cli import DATABASE_URL_ENV, build_parser, serve_configs
from service.config import ServiceConfig, read_config_file
from service.control_plane import ControlPlane, open_control_plane
from service.usage import Pricing
from tests.api.serve_process import cli


@pytest.mark.parametrize("bad", ["mysql://u:secretpw@db/x", "sqlite://relative", "sqlite:///", "postgresql",
                                 "postgresql://u:secretpw@db:port/x", ""])
def test_a_bad_database_url_is_refused_by_name_without_its_password(bad):
    with pytest.raises(ValueError, match="database.url") as info:
        ServiceConfig(database_url=bad)
    assert "secretpw" not in str(info.value)


@pytest.mark.parametrize("key, value, message", [
    ("pool_size", 0, r"database.pool_size=0 is invalid: must be an integer in \[1, 1000\]"),
    ("pool_size", True, "database.pool_size=True is invalid"),
    ("lease_ttl_s", 0, "database.lease_ttl_s=0 is invalid: must be a number of seconds > 0"),
    ("connect_timeout_s", -1, "database.connect_timeout_s=-1 is invalid"),
])
def test_bad_database_settings_are_named(key, value, message):
    with pytest.raises(ValueError, match=message):
        ServiceConfig(**{f"database_{key}": value})


def test_url_kinds_and_where_sqlite_lives(tmp_path):
    assert ServiceConfig().database_kind == "sqlite" and ServiceConfig(data_dir="d").sqlite_dir == "d"
    svc = ServiceConfig(data_dir=str(tmp_path / "data"), database_url=f"sqlite:///{tmp_path}/control")
    assert svc.database_kind == "sqlite" and svc.sqlite_dir == f"{tmp_path}/control"
    assert ServiceConfig(database_url="postgres://db/x").database_kind == "postgresql"
    plane = open_control_plane(svc, FilesystemStore(tmp_path / "store"), Pricing())
    try:
        assert type(plane) is ControlPlane and plane.ledger is plane.outbox  # one process's ledger
        assert sorted(p.name for p in (tmp_path / "control").glob("*.db")) == ["registry.db", "usage.db"]
    finally:
        plane.close()


def test_the_flag_beats_the_environment_which_beats_the_file(tmp_path, monkeypatch):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"database": {"url": "postgresql://file/x", "pool_size": 3}}))

    def url(*flags: str) -> str | None:
        *_, svc = serve_configs(build_parser().parse_args(["serve", "--config", str(path), *flags]))
        assert svc.database_pool_size == 3
        return svc.database_url

    monkeypatch.delenv(DATABASE_URL_ENV, raising=False)
    assert url() == "postgresql://file/x"
    monkeypatch.setenv(DATABASE_URL_ENV, "postgresql://env/x")
    assert url() == "postgresql://env/x"
    assert url("--database-url", "postgresql://flag/x") == "postgresql://flag/x"


def test_retired_and_unknown_keys_are_named(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"store": {"kind": "s3", "bucket": "b", "refresh_s": 5}}))
    with pytest.raises(ValueError, match="store.refresh_s is no longer read: replicas share adapter names through "
                                         "the database now"):
        read_config_file(str(path))
    path.write_text(yaml.safe_dump({"database": {"uri": "postgresql://db/x"}}))
    with pytest.raises(ValueError, match="unknown key database.uri; allowed keys are connect_timeout_s, lease_ttl_s, "
                                         "pool_size, url"):
        read_config_file(str(path))


def test_serve_refuses_a_bad_url_before_loading_anything():
    r = cli("serve", "--database-url", "mysql://app:topsecret@db/x", "--model", "/nonexistent")
    assert r.returncode == 2 and "database.url mysql://... is invalid" in r.stderr and "topsecret" not in r.stderr
