"""UsageService answers bad input with the right status code and a message naming the field, never UNKNOWN or
INTERNAL. Each case is named after its bad input. Another tenant's usage is NOT_FOUND for a non-admin, exactly
as for a tenant that does not exist."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from service.api.gen.loraserve.v1 import adapters_pb2 as apb
from service.api.gen.loraserve.v1 import inference_pb2 as ipb
from service.api.gen.loraserve.v1 import usage_pb2 as upb
from service.client import LoraServeClient
from service.tenants import hash_api_key
from tests.api.conftest import Server, rpc_error

INVALID, NOT_FOUND, DENIED = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                              grpc.StatusCode.PERMISSION_DENIED)
KEYS = {"alice": "alice-key-0123456789abcdef", "bob": "bob-key-0123456789abcdefgh",
        "ops": "ops-key-0123456789abcdefgh"}
HUGE = "x" * 100_000
T = 1_700_000_000  # a fixed instant, unix seconds
MAX_MESSAGE_CHARS = 600
BY_ADAPTER = upb.USAGE_GROUP_BY_ADAPTER


def auth(who: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {KEYS[who]}"),)


def ts(seconds: int) -> Timestamp:
    return Timestamp(seconds=seconds)


def dur(seconds: int = 0, nanos: int = 0) -> Duration:
    return Duration(seconds=seconds, nanos=nanos)


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    """alice has used the base model and the public startup adapter `tiny-lora`: two rows by adapter."""
    root = tmp_path_factory.mktemp("usage-bad-input")
    tenants = root / "tenants.yaml"
    tenants.write_text("tenants:\n" + "".join(
        f"  - id: {who}\n    api_keys: [\"{hash_api_key(key)}\"]\n    admin: {str(who == 'ops').lower()}\n"
        for who, key in KEYS.items()))
    s = Server(tiny[0], root / "data", adapter=tiny[1], service={"tenants_file": str(tenants)})
    sampling = ipb.SamplingParams(temperature=0, max_tokens=2)
    for adapter in ("", "local/tiny-lora"):
        s.stub.Generate(ipb.GenerateRequest(text="t5 t6", adapter=adapter, sampling=sampling),
                        metadata=auth("alice"), timeout=30)
    s.server.usage_writer.flush()
    first = s.usage.GetUsage(upb.GetUsageRequest(group_by=BY_ADAPTER, page_size=1), metadata=auth("alice"))
    assert len(first.rows) == 1 and first.next_page_token
    s.usage_token = first.next_page_token  # a real token, of the query (alice, by adapter, all time)
    with LoraServeClient(s.target, api_key=KEYS["ops"], timeout=30) as ops:
        ops.upload_adapter(tiny[1], "second")
    s.adapters_token = s.adapters.ListAdapters(apb.ListAdaptersRequest(page_size=1),
                                               metadata=auth("ops")).next_page_token
    assert s.adapters_token
    yield s
    s.close()


def c(bad: str, fields: dict, code: grpc.StatusCode, *fragments: str, who: str = "alice") -> tuple:
    """A case: what is bad, request fields, code, fragments the message must contain, caller."""
    return bad, fields, code, list(fragments), who


BAD_ADAPTERS = [
    ("adapter filter with path traversal", "../x"),
    ("adapter filter with two slashes", "a/b/c"),
    ("adapter filter in upper case", "A_UPPER"),
    ("adapter filter with two dots", "x..y"),
    ("adapter filter in unicode", "adaptér-ünï"),
    ("adapter filter of 100k characters", HUGE),
    ("adapter filter with version abc", "tiny-lora@abc"),
    ("adapter filter with an owner that is not a tenant id", "bad owner!/x"),
]

CASES = [
    c("group_by unknown enum value 99", {"group_by": 99}, INVALID, "group_by=99", "USAGE_GROUP_BY_TENANT"),
    c("group_by negative enum value", {"group_by": -1}, INVALID, "group_by=-1"),
    c("bucket of 59 s", {"bucket": dur(59)}, INVALID, "bucket=59", "at least 60 s"),
    c("bucket of 59.999 s", {"bucket": dur(59, 999_000_000)}, INVALID, "bucket=59.999", "at least 60 s"),
    c("bucket zero", {"bucket": dur()}, INVALID, "bucket=0", "at least 60 s"),
    c("bucket of 1 ns", {"bucket": dur(nanos=1)}, INVALID, "bucket=1e-09", "at least 60 s"),
    c("bucket negative", {"bucket": dur(-3600)}, INVALID, "bucket=-3600", "at least 60 s"),
    c("bucket of 60 s over 50 years", {"start_time": ts(T - 50 * 365 * 86400), "end_time": ts(T),
                                       "bucket": dur(60)}, INVALID, "buckets; at most 10000"),
    c("start after end", {"start_time": ts(T + 10), "end_time": ts(T)}, INVALID,
      "start_time must be before end_time"),
    c("start equal to end", {"start_time": ts(T), "end_time": ts(T)}, INVALID,
      "start_time must be before end_time"),
    c("start before 1970", {"start_time": ts(-100)}, INVALID, "start_time=-100", ">= 0"),
    c("end before 1970", {"end_time": ts(-100)}, INVALID, "start_time must be before end_time"),
    c("negative page_size", {"page_size": -1}, INVALID, "page_size=-1"),
    c("page_size most negative int32", {"page_size": -2**31}, INVALID, "page_size=-2147483648"),
    c("page_token not base64", {"page_token": "not a token!"}, INVALID, "page_token", "not one this server"),
    c("page_token of 100k characters", {"page_token": HUGE}, INVALID, "not one this server returned"),
    c("page_token in unicode", {"page_token": "ünï"}, INVALID, "not one this server returned"),
    c("page_token of ListAdapters", {"page_token": "{adapters_token}"}, INVALID,
      "not one this server returned"),
    c("page_token of another query", {"page_token": "{usage_token}", "group_by": upb.USAGE_GROUP_BY_TENANT},
      INVALID, "page_token belongs to a different query"),
    c("adapter filter by version number", {"adapter": "tiny-lora@2"}, INVALID,
      "adapter 'tiny-lora@2'", "by version id (v-...), not by number"),
    *[c(bad, {"adapter": a}, INVALID, "adapter is invalid") for bad, a in BAD_ADAPTERS],
    # the same answer whether the other tenant exists or not: it tells nothing about who else is served here
    c("another tenant as a non-admin", {"tenant": "bob"}, DENIED, "reading the usage of another tenant ('bob')",
      "needs the admin role", "'alice' does not have it"),
    c("unknown tenant as a non-admin", {"tenant": "nobody"}, DENIED, "reading the usage of another tenant ('nobody')",
      "needs the admin role"),
    c("tenant of 100k characters as a non-admin", {"tenant": HUGE}, DENIED, "needs the admin role"),
    c("every tenant * as a non-admin", {"tenant": "*"}, DENIED, "tenant='*'", "needs the admin role",
      "'alice' does not have it"),
    c("malformed tenant id as the admin", {"tenant": "bad id!"}, INVALID,
      "'bad id!' is not a valid tenant id", who="ops"),
    c("tenant of 100k characters as the admin", {"tenant": HUGE}, INVALID, "is not a valid tenant id",
      who="ops"),
]


@pytest.mark.parametrize(("bad", "fields", "code", "fragments", "who"), CASES, ids=[c[0] for c in CASES])
def test_bad_usage_request(server, bad, fields, code, fragments, who):
    tokens = {"{usage_token}": server.usage_token, "{adapters_token}": server.adapters_token}
    fields = {k: tokens.get(v, v) if isinstance(v, str) else v for k, v in fields.items()}
    err = rpc_error(server.usage.GetUsage, upb.GetUsageRequest(**fields), metadata=auth(who), timeout=30)
    assert err.code() == code, f"{bad}: {err.code()} {err.details()}"
    assert len(err.details()) <= MAX_MESSAGE_CHARS, f"{bad}: message of {len(err.details())} characters"
    for fragment in fragments:
        assert fragment in err.details(), f"{bad}: {fragment!r} not in {err.details()!r}"


def test_another_tenant_gets_the_same_answer_whether_it_exists_or_not(server):
    errs = [rpc_error(server.usage.GetUsage, upb.GetUsageRequest(tenant=t), metadata=auth("alice"))
            for t in ("bob", "nobody")]
    assert [e.code() for e in errs] == [grpc.StatusCode.PERMISSION_DENIED] * 2
    assert errs[0].details().replace("bob", "nobody") == errs[1].details()


@pytest.mark.parametrize("bucket", [None, dur(86400)], ids=["no bucket", "daily buckets"])
def test_unchanged_query_pages_on_without_start_or_end(server, bucket):
    """A page token is good for the query that made it: with start and end unset (now, for a bucket the last
    1000 buckets) the repeated query must come out the same, page after page."""
    req = upb.GetUsageRequest(group_by=BY_ADAPTER, page_size=1, bucket=bucket)
    first = server.usage.GetUsage(req, metadata=auth("alice"))
    req.page_token = first.next_page_token
    second = server.usage.GetUsage(req, metadata=auth("alice"))
    assert len(first.rows) == len(second.rows) == 1 and not second.next_page_token
    assert {first.rows[0].adapter, second.rows[0].adapter} == {"", "local/tiny-lora"}


VALID = [
    ("page_size 10**9 is capped", {"page_size": 10**9}),
    ("a bucket of 10,000 years is one bucket", {"bucket": dur(315_576_000_000)}),
    ("a window ending in the year 9999", {"start_time": ts(T), "end_time": ts(253_402_300_799)}),
    ("an adapter never used", {"adapter": "never-used"}),
    ("the base model only", {"adapter": "-"}),
]


@pytest.mark.parametrize(("what", "fields"), VALID, ids=[v[0] for v in VALID])
def test_huge_or_odd_values_that_are_valid(server, what, fields):
    rows = server.usage.GetUsage(upb.GetUsageRequest(**fields), metadata=auth("alice"), timeout=30).rows
    assert all(r.tenant in ("alice", "") for r in rows), what
    assert sum(r.requests for r in rows) <= 2


def test_the_admin_reads_every_tenant(server):
    rows = server.usage.GetUsage(upb.GetUsageRequest(tenant="*", group_by=upb.USAGE_GROUP_BY_TENANT),
                                 metadata=auth("ops")).rows
    assert [(r.tenant, r.requests) for r in rows] == [("alice", 2)]
