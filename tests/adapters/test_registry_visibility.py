"""AdapterRegistry visibility: another tenant's private adapter looks missing, sharing and public adapters, what
an unqualified name means (the caller's own, else the service's), bounded hints that never reveal private
adapters, admins."""

from __future__ import annotations

import pytest

from adapters.registry import (
    AdapterNotFound,
    AdapterPermissionDenied,
    AdapterRegistry,
    InvalidRegistryArgument,
)
from adapters.registry_types import LOCAL_OWNER
from tests.adapters.registry_helpers import meta, vid

# --- visibility --------------------------------------------------------------------------------------------


def _not_found_message(reg: AdapterRegistry, call) -> str:
    with pytest.raises(AdapterNotFound) as info:
        call(reg)
    return str(info.value)


@pytest.mark.parametrize("call", [
    lambda r: r.resolve("alice", "secret"),
    lambda r: r.resolve("alice", f"secret@{vid(1)}"),
    lambda r: r.resolve("alice", "bob/secret@1"),
    lambda r: r.get("alice", "secret"),
    lambda r: r.promote("alice", "bob/secret", vid(1)),
    lambda r: r.share("alice", "bob/secret", "*"),
    lambda r: r.delete_version("alice", "bob/secret", "1"),
    lambda r: r.delete_adapter("alice", "bob/secret"),
], ids=["resolve", "resolve@id", "resolve-qualified", "get", "promote", "share", "delete_version", "delete"])
def test_another_tenants_private_adapter_looks_missing(open_registry, call):
    empty, full = open_registry(), open_registry()
    if True:
        full.register_version("bob", "secret", vid(1), meta())
        assert _not_found_message(full, call) == _not_found_message(empty, call)
        assert "bob/secret" in [f"{a.owner}/{a.name}" for a in full.list("bob").adapters]
        assert full.list("alice").adapters == ()


def test_shared_and_public_adapters_are_visible(reg):
    reg.register_version("bob", "x", vid(1), meta())
    info = reg.share("bob", "x", ["alice"])
    assert info.visibility == "shared" and info.shared_with == ("alice",)
    assert reg.resolve("alice", "bob/x").owner == "bob"
    assert reg.resolve("alice", "bob/x@1").version_id == vid(1)
    with pytest.raises(AdapterNotFound):
        reg.resolve("carol", "bob/x")
    seen = reg.get("alice", "bob/x")
    assert seen.shared_with == () and len(seen.versions) == 1  # grantees do not learn of each other
    with pytest.raises(AdapterPermissionDenied, match="only its owner"):
        reg.promote("alice", "bob/x", "1")
    with pytest.raises(AdapterPermissionDenied):
        reg.delete_adapter("alice", "bob/x")

    assert reg.share("bob", "x", "*").visibility == "public"
    assert reg.resolve("carol", "bob/x").version_id == vid(1)
    assert [a.name for a in reg.list("carol").adapters] == ["x"]
    reg.unshare("bob", "x", "*")
    reg.unshare("bob", "x", ["alice"])
    for tenant in ("alice", "carol"):
        with pytest.raises(AdapterNotFound):
            reg.resolve(tenant, "bob/x")
    assert reg.get("bob", "x").visibility == "private"
    with pytest.raises(InvalidRegistryArgument):
        reg.share("bob", "x", "alice")  # a bare str other than "*" is a mistake, not a list of characters


# --- what an unqualified name means: the caller's own, else the service's (`local`), nothing else ------------


def _local(reg: AdapterRegistry, name: str, n: int) -> None:
    """What `serve --adapter NAME=DIR` registers: a public adapter of the service's."""
    reg.register_version(LOCAL_OWNER, name, vid(n), meta())
    reg.share(LOCAL_OWNER, name, "*")


def test_another_tenants_public_adapter_does_not_change_what_a_name_means(reg):
    _local(reg, "allcaps", 1)
    assert reg.resolve("alice", "allcaps").version_id == vid(1)
    reg.register_version("bob", "allcaps", vid(2), meta())
    reg.share("bob", "allcaps", "*")
    reg.share("bob", "allcaps", ["alice"])
    for tenant, admin in (("alice", False), ("root", True)):
        assert reg.resolve(tenant, "allcaps", admin=admin).version_id == vid(1)  # still the service's
        assert reg.resolve(tenant, "allcaps@1", admin=admin).owner == LOCAL_OWNER
        assert reg.get(tenant, "allcaps", admin=admin).owner == LOCAL_OWNER
    assert reg.resolve("bob", "allcaps").version_id == vid(2)  # bob's own comes first for bob
    # Bob's public adapter is reachable by its qualified name, the service's too.
    assert reg.resolve("alice", "bob/allcaps").version_id == vid(2)
    assert reg.get("alice", "bob/allcaps").visibility == "public"
    assert reg.resolve("bob", "local/allcaps").version_id == vid(1)


def test_ones_own_adapter_comes_before_the_services(reg):
    _local(reg, "allcaps", 1)
    reg.register_version("alice", "allcaps", vid(2), meta())
    assert reg.resolve("alice", "allcaps").version_id == vid(2)
    assert reg.get("alice", "allcaps").owner == "alice"
    assert reg.resolve("alice", "local/allcaps").version_id == vid(1)
    assert reg.resolve("carol", "allcaps").version_id == vid(1)
    reg.delete_adapter("alice", "allcaps")  # deletes her own, never the service's
    assert reg.resolve("alice", "allcaps").version_id == vid(1)


def test_a_name_only_others_share_is_not_found_with_the_qualified_names(reg):
    for owner, n in (("bob", 1), ("carol", 2)):
        reg.register_version(owner, "x", vid(n), meta())
    reg.share("bob", "x", ["alice"])
    reg.share("carol", "x", "*")
    for ref, hint in (("x", "bob/x, carol/x"), ("x@1", "bob/x@1, carol/x@1")):
        with pytest.raises(AdapterNotFound, match=rf"adapter 'x' not found .*your own adapter or the "
                                                  rf"service's.*: {hint}\)$"):
            reg.resolve("alice", ref)
    with pytest.raises(AdapterNotFound, match=r": carol/x\)$"):  # not shared with dave: bob's is not hinted
        reg.get("dave", "x")
    assert reg.resolve("alice", "carol/x").version_id == vid(2)
    # Writes too: an unqualified name never reaches another tenant's adapter, an admin's neither.
    with pytest.raises(AdapterNotFound, match="bob/x, carol/x"):
        reg.delete_adapter("root", "x", admin=True)
    for write in (lambda: reg.promote("alice", "x", "1"), lambda: reg.share("alice", "x", ["dave"]),
                  lambda: reg.delete_version("alice", "x", "1")):
        with pytest.raises(AdapterNotFound, match="not found"):
            write()
    with pytest.raises(AdapterPermissionDenied, match="only its owner"):
        reg.delete_adapter("alice", "carol/x")
    assert reg.delete_adapter("root", "carol/x", admin=True) == (vid(2),)
    assert len(reg.list("root", admin=True).adapters) == 1


def test_the_hint_is_bounded(reg):
    owners = [f"t{i}" for i in range(8)]
    for i, owner in enumerate(owners):
        reg.register_version(owner, "x", vid(i + 1), meta())
        reg.share(owner, "x", "*")
    with pytest.raises(AdapterNotFound) as info:
        reg.resolve("alice", "x")
    assert str(info.value).endswith(": t0/x, t1/x, t2/x, t3/x, t4/x, ...)")


def test_a_not_found_name_never_reveals_private_adapters(open_registry):
    """Other tenants' private adapters, and a service adapter made private, leave the message as it is
    without them; only adapters the caller can see are hinted."""
    def messages(reg: AdapterRegistry) -> list[str]:
        out = []
        for call in (lambda: reg.resolve("alice", "x"), lambda: reg.resolve("alice", "x@1"),
                     lambda: reg.get("alice", "x"), lambda: reg.promote("alice", "x", "1"),
                     lambda: reg.delete_adapter("alice", "x"), lambda: reg.resolve("alice", "local/x")):
            with pytest.raises(AdapterNotFound) as info:
                call()
            out.append(str(info.value))
        return out

    few, more = open_registry(), open_registry()
    if True:
        for reg in (few, more):
            reg.register_version("carol", "x", vid(3), meta())
            reg.share("carol", "x", "*")
        more.register_version("bob", "x", vid(1), meta())  # private
        more.register_version("erin", "x", vid(4), meta())
        more.share("erin", "x", ["dave"])  # shared, not with alice
        _local(more, "x", 2)
        more.unshare(LOCAL_OWNER, "x", "*")  # the service's, made private
        assert messages(more) == messages(few)
        assert "carol/x" in messages(few)[0] and "bob" not in messages(few)[0]


def test_admin_sees_and_manages_everything(reg):
    reg.register_version("bob", "x", vid(1), meta())
    reg.register_version("bob", "x", vid(2), meta())
    assert reg.resolve("root", "bob/x", admin=True).version_id == vid(2)
    assert reg.promote("root", "bob/x", "1", admin=True).version_id == vid(1)
    assert reg.get("root", "bob/x", admin=True).num_versions == 2
    assert [a.owner for a in reg.list("root", admin=True).adapters] == ["bob"]
