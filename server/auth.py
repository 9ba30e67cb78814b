"""Bearer API keys. Two kinds: tenant keys (their own adapters, files and jobs, plus public adapters) and
admin (operator) keys, which also see cluster-wide views (metrics, workers, placement). With no keys
configured, auth is off and every caller is the anonymous admin (the settings refuse that on a
non-loopback bind unless explicitly insecure)."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from server.errors import AuthenticationError, PermissionDeniedError
from server.request_context import note


@dataclass(frozen=True)
class Tenant:
    name: str
    admin: bool = False


ANONYMOUS = Tenant("anonymous", admin=True)
ADMIN_TENANT = "admin"  # the tenant an admin key acts as for its own uploads, files and jobs


class ApiKeyAuth:
    def __init__(self, tenants_by_key: dict[str, str], admin_keys: tuple[str, ...] = ()):
        self._keys = [(k.encode(), Tenant(t)) for k, t in tenants_by_key.items()]
        self._keys += [(k.encode(), Tenant(ADMIN_TENANT, admin=True)) for k in admin_keys]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def authenticate(self, authorization: str | None) -> Tenant:
        if not self._keys:
            return ANONYMOUS
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthenticationError("missing API key: send 'Authorization: Bearer <key>'")
        given = token.strip().encode()
        found = None
        for key, tenant in self._keys:  # compare against every key: no early exit timing
            if hmac.compare_digest(key, given):
                found = tenant
        if found is None:
            raise AuthenticationError("invalid API key")
        return found


async def current_tenant(request: Request) -> Tenant:  # async: no threadpool hop per request
    tenant = request.app.state.auth.authenticate(request.headers.get("authorization"))
    note(tenant=tenant.name)
    return tenant


async def current_admin(request: Request) -> Tenant:
    tenant = request.app.state.auth.authenticate(request.headers.get("authorization"))
    note(tenant=tenant.name)
    if not tenant.admin:
        raise PermissionDeniedError("this needs an admin (operator) API key", code="admin_required")
    return tenant


CurrentTenant = Annotated[Tenant, Depends(current_tenant)]
AdminTenant = Annotated[Tenant, Depends(current_admin)]
