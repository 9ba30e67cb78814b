"""The test session's cluster secret (tests/conftest.py puts it in the environment, so every gateway, worker
and trainer process a test starts inherits it) and an httpx auth that signs requests with it, for tests
that call a worker app directly."""

from __future__ import annotations

import os

import httpx

from adapters_store.cluster_auth import SECRET_ENV, ClusterSigner


def cluster_secret() -> bytes:
    return os.environ[SECRET_ENV].encode()


class ClusterAuth(httpx.Auth):
    """Signs each request as the gateway's worker client does."""

    requires_request_body = True

    def __init__(self, secret: bytes | None = None):
        self._signer = ClusterSigner(secret or cluster_secret())

    def auth_flow(self, request: httpx.Request):
        request.headers.update(self._signer.request_headers(request.method, request.url.raw_path.decode(),
                                                            request.content))
        yield request
