"""Tenants file validation, API-key and client-certificate authentication, and the per-tenant limiter."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import pytest

from service.limits import LimitExceeded, TenantLimiter, TenantLimitExceeded
from service.tenants import (
    DEFAULT_MAX_UPLOAD_BYTES,
    RequestOverLimit,
    Tenant,
    TenantConfigError,
    TenantDirectory,
    TenantLimits,
    cert_identities,
    generate_api_key,
    hash_api_key,
)

ALICE_KEY = "alice-secret-key-0001"
BOB_KEY = "bob-secret-key-000002"
ALICE_HASH = hash_api_key(ALICE_KEY)
BOB_HASH = hash_api_key(BOB_KEY)

GOOD = f"""
tenants:
  - id: alice
    api_keys: ["{ALICE_HASH}"]
    admin: false
    client_cert_subjects: ["CN=alice-service", "spiffe://corp/alice"]
    limits: {{max_concurrent_requests: 8, tokens_per_minute: 60000, max_prompt_tokens: 4096,
              max_output_tokens: 1024, max_upload_bytes: 67108864}}
  - id: bob
    api_keys: ["{BOB_HASH}"]
    limits: {{max_upload_bytes: null}}
    weight: 2.5
  - id: ops
    admin: true
    client_cert_subjects: ["CN=ops"]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tenants.yaml"
    path.write_text(text)
    return path


class FakeClock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


# --- the tenants file ---------------------------------------------------------------------------------------

def test_hash_api_key_is_sha256_hex():
    assert hash_api_key("abc" * 6) == "sha256:" + hashlib.sha256(b"abc" * 6).hexdigest()
    assert len(ALICE_HASH) == 7 + 64 and ALICE_HASH.startswith("sha256:")
    assert hash_api_key(ALICE_KEY) == ALICE_HASH != BOB_HASH
    key = generate_api_key()
    assert len(key) >= 40 and hash_api_key(key).startswith("sha256:")


@pytest.mark.parametrize("key, words", [("", "empty"), (" padded-key-0000000 ", "whitespace"),
                                        ("short", "at least 16")])
def test_hash_api_key_refuses(key, words):
    with pytest.raises(ValueError, match=words):
        hash_api_key(key)


def test_load_good_file(tmp_path):
    d = TenantDirectory.load(write(tmp_path, GOOD))
    assert d.auth_required and d.anonymous is None
    assert d.ids == ("alice", "bob", "ops")
    alice = d.get("alice")
    assert alice == Tenant(
        id="alice", admin=False, key_hashes=(ALICE_HASH,), cert_subjects=("CN=alice-service", "spiffe://corp/alice"),
        limits=TenantLimits(max_concurrent_requests=8, tokens_per_minute=60000, max_prompt_tokens=4096,
                            max_output_tokens=1024, max_upload_bytes=64 * 2**20))
    bob = d.get("bob")
    assert bob.limits == TenantLimits(max_upload_bytes=None)  # null: no limit
    assert bob.weight == 2.5 and d.weight("bob") == 2.5
    assert alice.weight == 1.0 and d.weight("carol") == 1.0  # the default share, also for an unknown id
    ops = d.get("ops")
    assert ops.admin and ops.key_hashes == () and ops.limits.max_upload_bytes == DEFAULT_MAX_UPLOAD_BYTES
    assert d.get("carol") is None


BAD_FILES = {
    "empty_file": ("", "is empty"),
    "not_yaml": ("tenants: [\n", "not valid YAML"),
    "top_level_list": ("- id: alice\n", "single key `tenants`"),
    "unknown_top_level_key": ("tenants: []\nusers: []\n", "unknown key.*users"),
    "no_tenants": ("tenants: []\n", "non-empty list"),
    "tenant_not_mapping": ("tenants: [alice]\n", r"tenants\[0\]: a tenant is a mapping"),
    "missing_id": (f"tenants:\n  - api_keys: ['{ALICE_HASH}']\n", r"tenants\[0\]: the field `id` is missing"),
    "bad_id": ("tenants:\n  - id: 'al/ice'\n", "tenant 'al/ice': id: .*not a valid tenant id"),
    "id_not_string": ("tenants:\n  - id: 42\n", r"tenants\[0\]: id: .*not a valid tenant id"),
    "unknown_tenant_field": ("tenants:\n  - id: alice\n    limit: {}\n",
                             "tenant 'alice': unknown field.*limit; allowed: id, api_keys"),
    "duplicate_tenant_id": ("tenants:\n  - id: alice\n  - id: alice\n", "tenant id 'alice' is listed twice"),
    "duplicate_key_across_tenants": (f"tenants:\n  - id: alice\n    api_keys: ['{ALICE_HASH}']\n"
                                     f"  - id: bob\n    api_keys: ['{ALICE_HASH}']\n",
                                     "tenants 'alice' and 'bob' both list the API key hash"),
    "duplicate_key_in_one_tenant": (f"tenants:\n  - id: alice\n"
                                    f"    api_keys: ['{ALICE_HASH}', '{ALICE_HASH}']\n",
                                    "tenant 'alice': api_keys: lists the same entry twice"),
    "duplicate_cert_across_tenants": ("tenants:\n  - id: alice\n    client_cert_subjects: [CN=x]\n"
                                      "  - id: bob\n    client_cert_subjects: [CN=x]\n",
                                      "tenants 'alice' and 'bob' both list the client certificate identity"),
    "plain_key": ("tenants:\n  - id: alice\n    api_keys: ['my-plain-secret-key']\n",
                  r"tenant 'alice': api_keys\[0\]: this looks like a plain API key"
                  r".*`loraserve tenants hash-key`"),
    "hash_too_short": ("tenants:\n  - id: alice\n    api_keys: ['sha256:abcd']\n",
                       r"api_keys\[0\]: a key hash is sha256: followed by 64 lowercase hex digits; "
                       r"this one has 4 characters"),
    "hash_uppercase": (f"tenants:\n  - id: alice\n    api_keys: ['sha256:{ALICE_HASH[7:].upper()}']\n",
                       "must be lowercase"),
    "hash_not_hex": ("tenants:\n  - id: alice\n    api_keys: ['sha256:" + "g" * 64 + "']\n",
                     "characters other than 0-9 and a-f"),
    "api_keys_not_list": (f"tenants:\n  - id: alice\n    api_keys: '{ALICE_HASH}'\n",
                          "api_keys must be a list"),
    "key_not_string": ("tenants:\n  - id: alice\n    api_keys: [12]\n", r"api_keys\[0\]: expected a string"),
    "admin_not_bool": ("tenants:\n  - id: alice\n    admin: 'maybe'\n",
                       "admin: 'maybe' is not true or false"),
    "cert_subject_blank": ("tenants:\n  - id: alice\n    client_cert_subjects: ['  ']\n",
                           r"client_cert_subjects\[0\]: .* is not a certificate identity"),
    "limits_not_mapping": ("tenants:\n  - id: alice\n    limits: [1]\n", "limits must be a mapping"),
    "unknown_limit": ("tenants:\n  - id: alice\n    limits: {max_rpm: 3}\n",
                      "limits: unknown limit.*max_rpm; allowed: max_concurrent_requests"),
    "limit_zero": ("tenants:\n  - id: alice\n    limits: {tokens_per_minute: 0}\n",
                   "tenant 'alice': limits.tokens_per_minute=0 is invalid: "
                   "a limit is a positive integer, or null"),
    "limit_negative": ("tenants:\n  - id: alice\n    limits: {max_concurrent_requests: -1}\n",
                       "max_concurrent_requests=-1 is invalid"),
    "limit_float": ("tenants:\n  - id: alice\n    limits: {max_prompt_tokens: 1.5}\n",
                    "max_prompt_tokens=1.5 is invalid"),
    "limit_bool": ("tenants:\n  - id: alice\n    limits: {max_output_tokens: true}\n",
                   "max_output_tokens=True is invalid"),
    "limit_string": ("tenants:\n  - id: alice\n    limits: {max_upload_bytes: 64MiB}\n",
                     "max_upload_bytes='64MiB' is invalid"),
    "weight_zero": ("tenants:\n  - id: alice\n    weight: 0\n",
                    "tenant 'alice': weight: 0 is invalid: a share weight is a number > 0"),
    "weight_negative": ("tenants:\n  - id: alice\n    weight: -2\n", "weight: -2 is invalid"),
    "weight_string": ("tenants:\n  - id: alice\n    weight: double\n", "weight: 'double' is invalid"),
    "weight_bool": ("tenants:\n  - id: alice\n    weight: true\n", "weight: True is invalid"),
    "weight_nan": ("tenants:\n  - id: alice\n    weight: .nan\n", "weight: nan is invalid"),
    "weight_huge": ("tenants:\n  - id: alice\n    weight: 1e9\n", "at most 1000"),
    "repeated_yaml_key": ("tenants:\n  - id: alice\n    limits: {}\n    limits: {tokens_per_minute: 5}\n",
                          "not valid YAML: the key 'limits' is repeated(.|\n)*tenants.yaml\", line 4"),
}


@pytest.mark.parametrize("text, message", BAD_FILES.values(), ids=BAD_FILES.keys())
def test_load_refuses_bad_file(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(TenantConfigError, match=message) as info:
        TenantDirectory.load(path)
    assert isinstance(info.value, ValueError)
    assert str(path) in str(info.value)  # every message names the file


def test_plain_key_is_not_echoed(tmp_path):
    with pytest.raises(TenantConfigError) as info:
        TenantDirectory.load(write(tmp_path, "tenants:\n  - id: alice\n"
                                             "    api_keys: ['hunter2-hunter2-hunter2']\n"))
    assert "hunter2" not in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(TenantConfigError, match="cannot read the tenants file"):
        TenantDirectory.load(tmp_path / "nope.yaml")


# --- authentication -----------------------------------------------------------------------------------------

def test_authenticate_key(tmp_path):
    d = TenantDirectory.load(write(tmp_path, GOOD))
    assert d.authenticate_key(ALICE_KEY).id == "alice"
    assert d.authenticate_key(BOB_KEY).id == "bob"
    assert d.authenticate_key("alice-secret-key-0002") is None  # wrong
    assert d.authenticate_key(ALICE_KEY + " ") is None  # exact match only
    assert d.authenticate_key(ALICE_HASH) is None  # the stored hash is not a key
    assert d.authenticate_key("") is None and d.authenticate_key(None) is None  # missing
    assert d.authenticate_key("\ud800") is None  # not encodable: no crash


def test_authenticate_cert(tmp_path):
    d = TenantDirectory.load(write(tmp_path, GOOD))
    assert d.authenticate_cert(["CN=alice-service"]).id == "alice"
    assert d.authenticate_cert(["CN=unknown", "spiffe://corp/alice"]).id == "alice"  # a SAN matches
    assert d.authenticate_cert(["CN=alice-service", "spiffe://corp/alice"]).id == "alice"  # both: one tenant
    assert d.authenticate_cert(["CN=ops"]).id == "ops"
    assert d.authenticate_cert(["alice-service"]) is None  # a bare CN is not `CN=...`
    assert d.authenticate_cert(["CN=alice-service", "CN=ops"]) is None  # two tenants: ambiguous, refused
    assert d.authenticate_cert([]) is None
    assert d.authenticate_cert("CN=ops").id == "ops"  # one string is one identity, not its characters


def test_cert_identities_from_grpc_auth_context(tmp_path):
    ctx = {"transport_security_type": [b"ssl"], "x509_common_name": [b"alice-service"],
           "x509_subject_alternative_name": [b"spiffe://corp/alice", b"10.0.0.7"]}
    assert cert_identities(ctx) == ["CN=alice-service", "spiffe://corp/alice", "10.0.0.7"]
    assert TenantDirectory.load(write(tmp_path, GOOD)).authenticate_cert(cert_identities(ctx)).id == "alice"
    assert cert_identities({}) == []


def test_open_access():
    d = TenantDirectory.open_access()
    assert not d.auth_required
    t = d.anonymous
    assert t is d.get("default") and t.admin and d.ids == ("default",)
    assert t.limits == TenantLimits.unlimited() and all(getattr(t.limits, f) is None for f in (
        "max_concurrent_requests", "tokens_per_minute", "max_prompt_tokens", "max_output_tokens",
        "max_upload_bytes", "max_loaded_adapters"))
    assert d.authenticate_key("anything-at-all-1234") is None  # no keys exist in open access


def test_request_bounds():
    limits = TenantLimits(max_prompt_tokens=100, max_output_tokens=50, max_upload_bytes=1000)
    t = Tenant("alice", limits=limits)
    t.check_request(100, 50)
    t.check_request(1, None)
    with pytest.raises(RequestOverLimit, match="prompt has 101 tokens; tenant 'alice' may send at most 100"):
        t.check_request(101, 1)
    with pytest.raises(RequestOverLimit, match="max_tokens=51 .* at most 50"):
        t.check_request(1, 51)
    t.check_upload(1000)
    with pytest.raises(RequestOverLimit, match="1001 bytes; tenant 'alice' may upload at most 1000"):
        t.check_upload(1001)
    assert issubclass(RequestOverLimit, ValueError)
    Tenant("bob", limits=TenantLimits.unlimited()).check_upload(10**12)


# --- the limiter --------------------------------------------------------------------------------------------

def test_concurrency_limit():
    limiter = TenantLimiter(clock=FakeClock(), concurrency_retry_s=0.5)
    alice = Tenant("alice", limits=TenantLimits(max_concurrent_requests=2))
    a, b = limiter.acquire(alice, 10), limiter.acquire(alice, 10)
    assert limiter.in_flight("alice") == 2
    with pytest.raises(TenantLimitExceeded) as info:
        limiter.acquire(alice, 10)
    e = info.value
    assert isinstance(e, LimitExceeded) and not isinstance(e, ValueError)
    assert e.retry_after_s == 0.5 and e.tenant == "alice" and e.limit == "max_concurrent_requests"
    assert "tenant 'alice'" in str(e) and "max_concurrent_requests=2" in str(e)
    assert "retry after 0.5 s" in str(e)
    # Other tenants are not affected.
    limiter.acquire(Tenant("bob", limits=TenantLimits(max_concurrent_requests=1)), 10).release()
    a.release()
    with limiter.acquire(alice, 10):
        assert limiter.in_flight("alice") == 2
    assert limiter.in_flight("alice") == 1
    b.release()
    assert limiter.in_flight("alice") == 0


def test_release_is_idempotent():
    limiter = TenantLimiter(clock=FakeClock())
    alice = Tenant("alice", limits=TenantLimits(max_concurrent_requests=1))
    lease = limiter.acquire(alice, 1)
    lease.release()
    lease.release()
    with lease:
        pass  # a third release on exit
    assert limiter.in_flight("alice") == 0
    second = limiter.acquire(alice, 1)  # the slot is free exactly once: no negative count to borrow from
    with pytest.raises(TenantLimitExceeded):
        limiter.acquire(alice, 1)
    second.release()


def test_token_bucket_with_fake_clock():
    clock = FakeClock()
    limiter = TenantLimiter(clock=clock)
    alice = Tenant("alice", limits=TenantLimits(tokens_per_minute=600))  # refills 10 tokens per second
    assert limiter.tokens_available(alice) == 600
    lease = limiter.acquire(alice, 500)
    assert limiter.tokens_available(alice) == 100
    lease.charge(300)  # output tokens: may overdraw
    assert lease.tokens == 800
    lease.release()
    assert limiter.tokens_available(alice) == -200
    with pytest.raises(TenantLimitExceeded) as info:
        limiter.acquire(alice, 1)
    e = info.value
    # Positive again once 201 tokens have refilled: 20.1 s at 10 tokens/s.
    assert e.retry_after_s == pytest.approx(20.1)
    assert e.limit == "tokens_per_minute" and e.tenant == "alice"
    assert "tenant 'alice'" in str(e) and "tokens_per_minute=600" in str(e) and "200 tokens over" in str(e)
    assert "retry after 20.1 s" in str(e)
    clock.t += 20.0
    assert limiter.tokens_available(alice) == pytest.approx(0.0)
    with pytest.raises(TenantLimitExceeded) as info:  # zero is not positive
        limiter.acquire(alice, 1)
    assert info.value.retry_after_s == pytest.approx(0.1)
    clock.t += 0.1
    limiter.acquire(alice, 5000).release()  # positive: admitted, however large, then charged
    assert limiter.tokens_available(alice) == pytest.approx(1 - 5000)
    clock.t += 3600.0
    assert limiter.tokens_available(alice) == 600  # refill stops at the capacity


def test_refused_requests_are_not_charged():
    clock = FakeClock()
    limiter = TenantLimiter(clock=clock)
    alice = Tenant("alice", limits=TenantLimits(max_concurrent_requests=1, tokens_per_minute=60))
    held = limiter.acquire(alice, 10)
    for _ in range(3):
        with pytest.raises(TenantLimitExceeded, match="max_concurrent_requests"):
            limiter.acquire(alice, 10)
    assert limiter.tokens_available(alice) == 50 and limiter.in_flight("alice") == 1
    held.release()


def test_unlimited_tenant_never_blocks():
    limiter = TenantLimiter(clock=FakeClock())
    free = Tenant("free", limits=TenantLimits())
    leases = [limiter.acquire(free, 10**9) for _ in range(1000)]
    leases[0].charge(10**9)
    assert limiter.tokens_available(free) is None
    for lease in leases:
        lease.release()


def test_limits_follow_a_reloaded_tenant():
    clock = FakeClock()
    limiter = TenantLimiter(clock=clock)
    old = Tenant("alice", limits=TenantLimits(max_concurrent_requests=1))
    lease = limiter.acquire(old, 1)
    new = Tenant("alice", limits=TenantLimits(max_concurrent_requests=2))
    limiter.acquire(new, 1).release()  # the raised limit applies at once, counting the request in flight
    lease.release()
    assert limiter.in_flight("alice") == 0


def test_bad_token_counts():
    limiter = TenantLimiter(clock=FakeClock())
    alice = Tenant("alice", limits=TenantLimits(tokens_per_minute=60))
    for bad in (-1, 1.5, True, "3"):
        with pytest.raises(ValueError, match="tokens="):
            limiter.acquire(alice, bad)
    lease = limiter.acquire(alice, 0)
    with pytest.raises(ValueError, match="tokens=-5"):
        lease.charge(-5)
    lease.release()


def test_concurrent_acquire_never_exceeds_limit():
    limiter = TenantLimiter(clock=FakeClock())
    alice = Tenant("alice", limits=TenantLimits(max_concurrent_requests=3))
    admitted: list[object] = []
    refused = []
    barrier = threading.Barrier(8)

    def worker() -> None:
        barrier.wait()
        for _ in range(50):
            try:
                admitted.append(limiter.acquire(alice, 1))
            except TenantLimitExceeded:
                refused.append(1)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(admitted) == 3 and len(refused) == 8 * 50 - 3
    for lease in admitted:
        lease.release()
    assert limiter.in_flight("alice") == 0
