"""Bearer API keys, each belonging to a tenant. With no keys configured, auth is off (the settings
refuse that on a non-loopback bind unless explicitly insecure)."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from server.errors import AuthenticationError


@dataclass(frozen=True)
class Tenant:
    name: str


ANONYMOUS = Tenant("anonymous")


class ApiKeyAuth:
    def __init__(self, tenants_by_key: dict[str, str]):
        self._keys = [(k.encode(), Tenant(t)) for k, t in tenants_by_key.items()]

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
    return request.app.state.auth.authenticate(request.headers.get("authorization"))


CurrentTenant = Annotated[Tenant, Depends(current_tenant)]
