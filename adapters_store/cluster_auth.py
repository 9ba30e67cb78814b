"""Cluster credentials: proof that a request or a Redis record comes from a member of this cluster, i.e.
from a process that holds the cluster secret. Torch-free and framework-free; the gateway's worker client
signs, the worker's middleware (`workers.service.request_auth`) verifies, heartbeats sign their `WorkerInfo` and the
gateway's registry verifies it.

The secret comes from `ADAPTERD_CLUSTER_SECRET` (the value) or `ADAPTERD_CLUSTER_SECRET_FILE` (a file
holding it); `adapterd serve` writes one into its data dir (mode 0600) when neither is set.

A signed request carries three headers:

    X-Adapterd-Timestamp  milliseconds since the epoch, when it was signed
    X-Adapterd-Nonce      32 hex characters, never reused
    X-Adapterd-Signature  hex HMAC-SHA256(secret, "adapterd-request-v1\\n" METHOD "\\n" PATH?QUERY "\\n"
                          sha256(body) hex "\\n" timestamp "\\n" nonce)

The verifier refuses a timestamp more than `WINDOW_S` away from its clock and a nonce it has already
seen. Its nonce memory is bounded: when full it forgets the oldest and from then on refuses everything
signed at or before that one's timestamp, so a forgotten nonce can never be replayed.

A signed record (a worker's registration) is HMAC-SHA256(secret, "adapterd-record-v1\\n" KIND "\\n" payload):
the different prefixes keep a record signature from ever passing as a request signature, or the reverse.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

SECRET_ENV = "ADAPTERD_CLUSTER_SECRET"
SECRET_FILE_ENV = "ADAPTERD_CLUSTER_SECRET_FILE"
MIN_SECRET_CHARS = 16
WINDOW_S = 60.0
MAX_NONCES = 200_000

TIMESTAMP_HEADER = "x-adapterd-timestamp"
NONCE_HEADER = "x-adapterd-nonce"
SIGNATURE_HEADER = "x-adapterd-signature"


class ClusterSecretError(RuntimeError):
    """No usable cluster secret was configured (a start-up error, not a request error)."""


class SignatureError(Exception):
    """A request that does not prove cluster membership; the message says why, and names no secret."""


def load_secret(value: str | None = None, file: str | Path | None = None,
                env: Mapping[str, str] | None = None) -> bytes:
    """The cluster secret: `value`, else the contents of `file`, else the environment's; raises
    ClusterSecretError when none is set or it is too short to be one."""
    env = os.environ if env is None else env
    value = value or env.get(SECRET_ENV, "")
    file = file or env.get(SECRET_FILE_ENV, "")
    if not value and file:
        try:
            value = Path(file).read_text().strip()
        except OSError as exc:
            raise ClusterSecretError(f"cannot read the cluster secret file: {exc.strerror}") from exc
    if not value:
        raise ClusterSecretError(f"no cluster secret: set {SECRET_ENV} or {SECRET_FILE_ENV}")
    if len(value.strip()) < MIN_SECRET_CHARS:
        raise ClusterSecretError(f"the cluster secret must have at least {MIN_SECRET_CHARS} characters")
    return value.strip().encode()


def create_secret_file(path: Path) -> Path:
    """Writes a new random secret to `path` (mode 0600) unless the file exists; returns `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    return path


def _digest(secret: bytes, message: bytes) -> str:
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def _request_message(method: str, path_qs: str, body: bytes, timestamp: str, nonce: str) -> bytes:
    parts = ("adapterd-request-v1", method.upper(), path_qs, hashlib.sha256(body).hexdigest(), timestamp, nonce)
    return "\n".join(parts).encode()


class ClusterSigner:
    """Signs requests and records with the cluster secret."""

    def __init__(self, secret: bytes):
        if len(secret) < MIN_SECRET_CHARS:
            raise ClusterSecretError(f"the cluster secret must have at least {MIN_SECRET_CHARS} characters")
        self._secret = secret

    def request_headers(self, method: str, path_qs: str, body: bytes = b"",
                        signed_at: float | None = None) -> dict[str, str]:
        """The signature headers; `signed_at` (epoch seconds) defaults to now."""
        timestamp = str(int((time.time() if signed_at is None else signed_at) * 1000))
        nonce = secrets.token_hex(16)
        signature = _digest(self._secret, _request_message(method, path_qs, body, timestamp, nonce))
        return {TIMESTAMP_HEADER: timestamp, NONCE_HEADER: nonce, SIGNATURE_HEADER: signature}

    def sign_record(self, kind: str, payload: bytes) -> str:
        return _digest(self._secret, b"adapterd-record-v1\n" + kind.encode() + b"\n" + payload)

    def record_valid(self, kind: str, payload: bytes, signature: str) -> bool:
        return hmac.compare_digest(self.sign_record(kind, payload), signature or "")


class RequestVerifier:
    """Checks signed requests: signature, time window, nonce never seen before (per process)."""

    def __init__(self, secret: bytes, window_s: float = WINDOW_S, max_nonces: int = MAX_NONCES,
                 clock=time.time):
        self._secret = secret
        self._window_ms = int(window_s * 1000)
        self._max_nonces = max_nonces
        self._clock = clock
        self._seen: OrderedDict[str, int] = OrderedDict()  # nonce → its timestamp (ms), oldest first
        self._floor_ms = 0  # everything signed at or before this was possibly forgotten: refused

    def check_headers(self, headers: Mapping[str, str]) -> tuple[str, str, str]:
        """The cheap checks before the body is read: headers present and well formed, time in the window."""
        timestamp = headers.get(TIMESTAMP_HEADER, "")
        nonce = headers.get(NONCE_HEADER, "")
        signature = headers.get(SIGNATURE_HEADER, "")
        if not (timestamp and nonce and signature):
            raise SignatureError("this worker accepts only requests signed with the cluster secret")
        if not timestamp.isdigit() or not (8 <= len(nonce) <= 64) or len(signature) != 64:
            raise SignatureError("malformed cluster signature headers")
        now_ms = int(self._clock() * 1000)
        if abs(now_ms - int(timestamp)) > self._window_ms:
            raise SignatureError("the request's signature is outside the accepted time window")
        return timestamp, nonce, signature

    def verify(self, method: str, path_qs: str, body: bytes, headers: Mapping[str, str]) -> None:
        """Raises SignatureError unless the request is signed, fresh and not a replay (then remembers it)."""
        timestamp, nonce, signature = self.check_headers(headers)
        expected = _digest(self._secret, _request_message(method, path_qs, body, timestamp, nonce))
        if not hmac.compare_digest(expected, signature):
            raise SignatureError("the request's cluster signature does not verify")
        self._remember(nonce, int(timestamp))

    def _remember(self, nonce: str, timestamp_ms: int) -> None:
        horizon = int(self._clock() * 1000) - self._window_ms
        while self._seen and next(iter(self._seen.values())) < horizon:  # expired: the window refuses them
            self._seen.popitem(last=False)
        if nonce in self._seen or timestamp_ms <= self._floor_ms:
            raise SignatureError("a replayed request (its nonce was already used)")
        while len(self._seen) >= self._max_nonces:
            _, forgotten = self._seen.popitem(last=False)
            self._floor_ms = max(self._floor_ms, forgotten)
        self._seen[nonce] = timestamp_ms
