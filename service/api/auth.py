"""Who is calling: a tenant from `authorization: Bearer <key>` metadata or from a client certificate (mTLS).

Health checks and reflection need no key (probes and tooling call them). With no tenants file every
call is the admin tenant `default` (development). The interceptor authenticates once per RPC and puts
the tenant in a context variable the servicers read with `current_tenant()`. It runs inside the error
interceptor (`service.api.errors`), which turns its refusals into UNAUTHENTICATED.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import structlog

from service.api.handlers import rewrap
from service.tenants import Tenant, TenantDirectory, cert_identities


class Unauthenticated(Exception):
    """No valid credentials (UNAUTHENTICATED)."""


class PermissionDenied(Exception):
    """Authenticated, but the call needs a role the tenant does not have (PERMISSION_DENIED)."""


_tenant: contextvars.ContextVar[Tenant | None] = contextvars.ContextVar("loraserve_tenant", default=None)


def current_tenant() -> Tenant:
    tenant = _tenant.get()
    if tenant is None:
        raise Unauthenticated("the call is not authenticated")
    return tenant


def set_current_tenant(tenant: Tenant | None) -> None:
    _tenant.set(tenant)


def require_admin(tenant: Tenant, what: str) -> None:
    if not tenant.admin:
        raise PermissionDenied(f"{what} needs the admin role; tenant {tenant.id!r} does not have it")


class Authenticator:
    def __init__(self, tenants: TenantDirectory) -> None:
        self.tenants = tenants

    def authenticate(self, context: grpc.ServicerContext) -> Tenant:
        if not self.tenants.auth_required:
            tenant = self.tenants.anonymous
            assert tenant is not None  # open access always has its one tenant
            return tenant
        key = _bearer(context.invocation_metadata() or ())
        if key is not None:
            return self._by_key(key, "the 'authorization' metadata")
        subjects = cert_identities(context.auth_context() or {})
        if subjects:
            tenant = self.tenants.authenticate_cert(subjects)
            if tenant is not None:
                return tenant
            raise Unauthenticated("the client certificate is not mapped to a tenant, and no API key was given")
        raise Unauthenticated("no credentials: send 'authorization: Bearer <API key>' metadata")

    def authenticate_header(self, authorization: str | None) -> Tenant:
        """The tenant of an HTTP call's `Authorization` header (the same keys as gRPC's metadata)."""
        if not self.tenants.auth_required:
            tenant = self.tenants.anonymous
            assert tenant is not None
            return tenant
        if authorization is None:
            raise Unauthenticated("no credentials: send the header 'Authorization: Bearer <API key>'")
        return self._by_key(_parse_bearer(authorization, "the Authorization header"), "the Authorization header")

    def _by_key(self, key: str, where: str) -> Tenant:
        tenant = self.tenants.authenticate_key(key)
        if tenant is None:
            raise Unauthenticated(f"the API key is not valid: no tenant has it (check the key in {where})")
        return tenant


def _bearer(metadata: Any) -> str | None:
    for item in metadata:
        if item.key.lower() != "authorization":
            continue
        return _parse_bearer(str(item.value), "the authorization metadata")
    return None


def _parse_bearer(value: str, where: str) -> str:
    scheme, _, key = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthenticated(f"{where} must be 'Bearer <API key>'")
    return key.strip()


class AuthInterceptor(grpc.ServerInterceptor):
    """Authenticates every loraserve RPC before its servicer runs and makes the tenant `current_tenant()`."""

    def __init__(self, auth: Authenticator) -> None:
        self.auth = auth

    def _enter(self, context: grpc.ServicerContext) -> None:
        tenant = self.auth.authenticate(context)
        set_current_tenant(tenant)
        structlog.contextvars.bind_contextvars(tenant=tenant.id)

    def _unary(self, behavior: Callable, method: str) -> Callable:
        def handler(request: Any, context: grpc.ServicerContext) -> Any:
            self._enter(context)
            try:
                return behavior(request, context)
            finally:
                set_current_tenant(None)
        return handler

    def _stream(self, behavior: Callable, method: str) -> Callable:
        def handler(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            self._enter(context)
            try:
                yield from behavior(request, context)
            finally:
                set_current_tenant(None)
        return handler

    def intercept_service(self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails) -> Any:
        return rewrap(continuation(handler_call_details), handler_call_details.method, self._unary, self._stream)
