import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class UsageGroupBy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    USAGE_GROUP_BY_UNSPECIFIED: _ClassVar[UsageGroupBy]
    USAGE_GROUP_BY_TENANT: _ClassVar[UsageGroupBy]
    USAGE_GROUP_BY_ADAPTER: _ClassVar[UsageGroupBy]
    USAGE_GROUP_BY_ADAPTER_VERSION: _ClassVar[UsageGroupBy]
USAGE_GROUP_BY_UNSPECIFIED: UsageGroupBy
USAGE_GROUP_BY_TENANT: UsageGroupBy
USAGE_GROUP_BY_ADAPTER: UsageGroupBy
USAGE_GROUP_BY_ADAPTER_VERSION: UsageGroupBy

class GetUsageRequest(_message.Message):
    __slots__ = ("tenant", "adapter", "start_time", "end_time", "group_by", "bucket", "page_size", "page_token")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    GROUP_BY_FIELD_NUMBER: _ClassVar[int]
    BUCKET_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    adapter: str
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    group_by: UsageGroupBy
    bucket: _duration_pb2.Duration
    page_size: int
    page_token: str
    def __init__(self, tenant: _Optional[str] = ..., adapter: _Optional[str] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., group_by: _Optional[_Union[UsageGroupBy, str]] = ..., bucket: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class UsageRow(_message.Message):
    __slots__ = ("tenant", "adapter", "adapter_version", "start_time", "end_time", "requests", "input_tokens", "cached_input_tokens", "output_tokens", "engine_seconds", "estimated_cost", "cost_unit", "failed_requests", "cancelled_requests")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_VERSION_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ENGINE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_COST_FIELD_NUMBER: _ClassVar[int]
    COST_UNIT_FIELD_NUMBER: _ClassVar[int]
    FAILED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    adapter: str
    adapter_version: str
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    requests: int
    input_tokens: int
    cached_input_tokens: int
    output_tokens: int
    engine_seconds: float
    estimated_cost: float
    cost_unit: str
    failed_requests: int
    cancelled_requests: int
    def __init__(self, tenant: _Optional[str] = ..., adapter: _Optional[str] = ..., adapter_version: _Optional[str] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., requests: _Optional[int] = ..., input_tokens: _Optional[int] = ..., cached_input_tokens: _Optional[int] = ..., output_tokens: _Optional[int] = ..., engine_seconds: _Optional[float] = ..., estimated_cost: _Optional[float] = ..., cost_unit: _Optional[str] = ..., failed_requests: _Optional[int] = ..., cancelled_requests: _Optional[int] = ...) -> None: ...

class GetUsageResponse(_message.Message):
    __slots__ = ("rows", "next_page_token")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    rows: _containers.RepeatedCompositeFieldContainer[UsageRow]
    next_page_token: str
    def __init__(self, rows: _Optional[_Iterable[_Union[UsageRow, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetFairShareRequest(_message.Message):
    __slots__ = ("tenant",)
    TENANT_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    def __init__(self, tenant: _Optional[str] = ...) -> None: ...

class TenantFairShare(_message.Message):
    __slots__ = ("tenant", "weight", "service", "requests")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    weight: float
    service: float
    requests: int
    def __init__(self, tenant: _Optional[str] = ..., weight: _Optional[float] = ..., service: _Optional[float] = ..., requests: _Optional[int] = ...) -> None: ...

class GetFairShareResponse(_message.Message):
    __slots__ = ("policy", "input_token_weight", "output_token_weight", "tenants")
    POLICY_FIELD_NUMBER: _ClassVar[int]
    INPUT_TOKEN_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKEN_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    TENANTS_FIELD_NUMBER: _ClassVar[int]
    policy: str
    input_token_weight: float
    output_token_weight: float
    tenants: _containers.RepeatedCompositeFieldContainer[TenantFairShare]
    def __init__(self, policy: _Optional[str] = ..., input_token_weight: _Optional[float] = ..., output_token_weight: _Optional[float] = ..., tenants: _Optional[_Iterable[_Union[TenantFairShare, _Mapping]]] = ...) -> None: ...
