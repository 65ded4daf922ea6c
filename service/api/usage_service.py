"""UsageService: a tenant's usage from the ledger, and where it stands in the fair-share scheduler; the admin
may ask for any tenant or for all of them."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from adapters.registry_types import AdapterRef
from service.api.auth import current_tenant, require_admin
from service.api.gen.loraserve.v1 import usage_pb2 as pb
from service.api.gen.loraserve.v1 import usage_pb2_grpc as pb_grpc
from service.engine.fairness import FairShare
from service.usage import UsageLedger

MIN_BUCKET_S = 60.0
DEFAULT_BUCKETS = 1000  # with a bucket but no start time: this many buckets back from the end
_GROUP_BY = {pb.USAGE_GROUP_BY_UNSPECIFIED: "adapter", pb.USAGE_GROUP_BY_TENANT: "tenant",
             pb.USAGE_GROUP_BY_ADAPTER: "adapter", pb.USAGE_GROUP_BY_ADAPTER_VERSION: "adapter_version"}


class UsageServicer(pb_grpc.UsageServiceServicer):
    def __init__(self, ledger: UsageLedger, resolve_owner: Callable[[str, str, bool], str | None],
                 fair: FairShare) -> None:
        """`resolve_owner(tenant, name, admin)`: the owner of the adapter `name` the tenant sees, or None;
        `fair`: the engine's fair-share counters (read from the RPC threads: `FairShare.shares` copies)."""
        self.ledger = ledger
        self.resolve_owner = resolve_owner
        self.fair = fair

    def GetFairShare(self, request: pb.GetFairShareRequest, context: grpc.ServicerContext) -> pb.GetFairShareResponse:
        caller = current_tenant()
        wanted: str | None = request.tenant or caller.id
        if request.tenant == "*":
            require_admin(caller, "tenant='*' (the fair share of every tenant)")
            wanted = None
        elif wanted != caller.id and not caller.admin:
            require_admin(caller, f"reading the fair share of another tenant ({request.tenant[:80]!r})")
        fair = self.fair
        # `also`: a tenant the scheduler has not served yet is listed too, with nothing served
        shares = fair.shares() if wanted is None else [s for s in fair.shares(also=[wanted]) if s.tenant == wanted]
        return pb.GetFairShareResponse(
            policy=fair.policy, input_token_weight=fair.input_token_weight,
            output_token_weight=fair.output_token_weight,
            tenants=[pb.TenantFairShare(tenant=s.tenant, weight=s.weight, service=s.service, requests=s.requests)
                     for s in shares])

    def GetUsage(self, request: pb.GetUsageRequest, context: grpc.ServicerContext) -> pb.GetUsageResponse:
        caller = current_tenant()
        tenant: str | None = request.tenant or caller.id
        if request.tenant == "*":
            require_admin(caller, "tenant='*' (the usage of every tenant)")
            tenant = None  # every tenant
        if tenant != caller.id and not caller.admin:
            # A tenant reads its own usage only. Whether the other tenant exists or not, the answer is the same, so it
            # tells nothing about who else is served here.
            require_admin(caller, f"reading the usage of another tenant ({request.tenant[:80]!r})")
        if request.group_by not in _GROUP_BY:
            raise ValueError(f"group_by={request.group_by} is invalid: use USAGE_GROUP_BY_TENANT, "
                             "USAGE_GROUP_BY_ADAPTER or USAGE_GROUP_BY_ADAPTER_VERSION")
        bucket = None
        if request.HasField("bucket"):
            bucket = request.bucket.ToNanoseconds() / 1e9
            if bucket < MIN_BUCKET_S:
                raise ValueError(f"bucket={bucket} s is invalid: at least {MIN_BUCKET_S:.0f} s, or leave it unset "
                                 "for one row per group over the whole window")
        # An unset end stays None: the ledger pins "now" in its page token, and a page token is only valid for
        # the very query that made it, so every argument must come out the same on the next page.
        end = _seconds(request.end_time) if request.HasField("end_time") else None
        now = time.time()
        if request.HasField("start_time"):
            start = _seconds(request.start_time)
        elif bucket is None:
            start = 0.0
        else:  # the last DEFAULT_BUCKETS buckets, from a bucket boundary (the same one while paging)
            last = math.floor((now if end is None else end) / bucket)
            start = max(0.0, (last - DEFAULT_BUCKETS + 1) * bucket)
        if not start < (now if end is None else end):
            raise ValueError("start_time must be before end_time")
        adapter, version = self._adapter_filter(request.adapter, caller)
        rows, token = self.ledger.query(tenant=tenant, adapter=adapter, adapter_version=version, start_time=start,
                                        end_time=end, group_by=_GROUP_BY[request.group_by], bucket_s=bucket,
                                        page_size=request.page_size, page_token=request.page_token)
        unit = self.ledger.pricing.unit
        return pb.GetUsageResponse(rows=[pb.UsageRow(
            tenant=r.tenant, adapter=r.adapter, adapter_version=r.adapter_version, start_time=_ts(r.start_time),
            end_time=_ts(r.end_time), requests=r.requests, input_tokens=r.input_tokens,
            cached_input_tokens=r.cached_input_tokens, output_tokens=r.output_tokens,
            engine_seconds=r.engine_seconds, estimated_cost=r.estimated_cost, cost_unit=unit,
            failed_requests=r.failed_requests, cancelled_requests=r.cancelled_requests) for r in rows],
            next_page_token=token)


    def _adapter_filter(self, ref: str, caller) -> tuple[str | None, str | None]:  # noqa: ANN001
        """The request's adapter filter -> (owner/name or "" for the base model or None, version id or None)."""
        if not ref:
            return None, None
        if ref == "-":
            return "", None
        try:
            parsed = AdapterRef.parse(ref)
        except ValueError as e:
            raise ValueError(f"adapter is invalid: {e}; use name, owner/name (optionally @version) or '-'") from None
        owner = parsed.owner or self.resolve_owner(caller.id, parsed.name, caller.admin) or caller.id
        version = parsed.version
        if version is not None and not version.startswith("v-"):
            raise ValueError(f"adapter {ref!r}: filter usage by version id (v-...), not by number")
        return f"{owner}/{parsed.name}", version


def _seconds(ts: Timestamp) -> float:
    return ts.ToNanoseconds() / 1e9


def _ts(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts
