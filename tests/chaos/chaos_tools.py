"""Faults against a real `adapterd serve` (embedded valkey, gateway, workers as processes on 127.0.0.1):
start it, find its processes, drive concurrent clients, kill -9 a process, send oversized chunked bodies,
fuzz the OpenAPI schema. Shared by tests/chaos (short runs, in CI) and bench/chaos_bench.py (longer).

Every wait is a poll with a deadline; every client request has its own timeout (a request that runs past
it is counted as a hang)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
ADAPTERD = [sys.executable, "-m", "server.operator_cli"]  # the server distribution's operator commands (serve)
MB = 1024 * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict[str, str]:
    e = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    e["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), str(ROOT / "clients"), e.get("PYTHONPATH")]))
    return e


def wait_until(check, timeout: float, what: str) -> float:
    """Polls `check()` until true; returns the seconds it took."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            if check():
                return time.monotonic() - start
        except (httpx.HTTPError, OSError):
            pass
        time.sleep(0.1)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


# ---- processes -------------------------------------------------------------------------------------

def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


class PeakGrowth:
    """The peak RSS of processes over a block, above their RSS when it began (Linux: the peak is reset by
    writing 5 to /proc/PID/clear_refs). `with PeakGrowth([pid]) as g: …; g.mb[pid]`."""

    def __init__(self, pids: list[int]):
        self.pids, self.mb = pids, {}

    def __enter__(self) -> PeakGrowth:
        self.before = {}
        for pid in self.pids:
            Path(f"/proc/{pid}/clear_refs").write_text("5")
            self.before[pid] = rss_mb(pid)
        return self

    def __exit__(self, *exc) -> None:
        self.mb = {pid: round(rss_mb(pid, "VmHWM") - self.before[pid], 1) for pid in self.pids}


@dataclass
class Served:
    proc: subprocess.Popen
    url: str
    data_dir: Path
    log: Path

    def roles(self) -> dict[str, list[int]]:
        """Live processes under `adapterd serve` by role: gateway, worker, trainer, valkey."""
        out: dict[str, list[int]] = {"gateway": [], "worker": [], "trainer": [], "valkey": []}
        todo = [self.proc.pid]
        tree = _children()
        while todo:
            for pid in tree.get(todo.pop(), []):
                todo.append(pid)
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                except OSError:
                    continue
                if not _alive(pid):
                    continue
                role = ("valkey" if "valkey-server" in cmd else "worker" if "workers.service" in cmd
                        else "trainer" if "workers.trainer" in cmd else "gateway" if "-m server" in cmd else None)
                if role:
                    out[role].append(pid)
        return out

    def replaced(self, role: str, dead: int) -> bool:
        """`dead` is gone and every process of `role` runs (workers: each answers /health on its port)."""
        pids = self.roles()[role]
        if dead in pids or not pids:
            return False
        return role != "worker" or all(_health(pid) for pid in pids)

    def ready(self) -> dict:
        r = httpx.get(self.url + "/ready", timeout=3)
        return r.json() if r.status_code == 200 else {}

    def base_model(self, timeout: float = 30) -> str:
        """The base model id, from /ready once it answers 200."""
        seen: dict = {}
        wait_until(lambda: seen.update(self.ready()) or "model" in seen, timeout, "/ready to answer")
        return seen["model"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""


def upload_adapter(http: httpx.Client, name: str, folder: Path) -> dict:
    """Uploads a PEFT folder into the store through the API (stored adapters survive anything Redis does)."""
    files = [("files", (p.name, p.read_bytes())) for p in sorted(folder.iterdir()) if p.is_file()]
    r = http.post("/v1/adapters", files=files, data={"name": name})
    r.raise_for_status()
    return r.json()


def big_training_file(path: Path, mb: int) -> Path:
    """A valid JSONL training file of about `mb` MB (1 KB records)."""
    line = (json.dumps({"prompt": "p" * 900, "completion": "c" * 80}) + "\n").encode()
    with path.open("wb") as f:
        for _ in range(mb * MB // len(line)):
            f.write(line)
    return path


def upload_peak_growth_mb(served: Served, path: Path) -> tuple[int, float]:
    """Uploads a training file (streamed by the client); returns (status, the gateway's peak RSS growth, MB)."""
    gateway = served.roles()["gateway"][0]
    with PeakGrowth([gateway]) as growth, path.open("rb") as f:
        r = httpx.post(served.url + "/v1/files", files={"file": (path.name, f)}, data={"purpose": "fine-tune"},
                       timeout=300)
    return r.status_code, growth.mb[gateway]


def serve(model: Path, data_dir: Path, logs: Path, workers: int = 2, timeout: float = 180) -> Served:
    port = free_port()
    log = logs / "serve.log"
    args = [*ADAPTERD, "serve", "--port", str(port), "--workers", str(workers), "--model", str(model),
            "--data-dir", str(data_dir), "--heartbeat-ttl", "2"]
    proc = subprocess.Popen(args, cwd=ROOT, env=env(), stdout=log.open("wb"), stderr=subprocess.STDOUT)
    served = Served(proc, f"http://127.0.0.1:{port}", data_dir, log)
    try:
        wait_until(lambda: proc.poll() is None and served.ready().get("workers", 0) >= workers, timeout,
                   "adapterd serve to be ready")
    except TimeoutError:
        served.stop()
        raise RuntimeError(f"serve did not come up:\n{served.tail()}") from None
    return served


def listening_ports(pid: int) -> list[int]:
    """The TCP ports process `pid` listens on (its socket inodes in /proc/net/tcp)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return [int(parts[1].split(":")[1], 16) for parts in
            (line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:])
            if parts[3] == "0A" and parts[9] in inodes]  # 0A: LISTEN


def _health(pid: int) -> bool:
    ports = listening_ports(pid)
    return bool(ports) and httpx.get(f"http://127.0.0.1:{ports[0]}/health", timeout=2).status_code == 200


def kill9(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


# ---- concurrent clients -----------------------------------------------------------------------------

@dataclass
class LoadResult:
    ok: int = 0
    hangs: int = 0
    failures: Counter = field(default_factory=Counter)  # "503 worker_unreachable", "stream error ..."
    unclean: list[str] = field(default_factory=list)  # failures that are not a clean 503 / error event
    ok_after: dict[str, int] = field(default_factory=dict)  # successes after each mark

    @property
    def requests(self) -> int:
        return self.ok + self.hangs + sum(self.failures.values())

    def as_dict(self) -> dict:
        return {"requests": self.requests, "ok": self.ok, "hangs": self.hangs,
                "failures": dict(self.failures), "unclean": self.unclean[:20], "ok_after": self.ok_after}


async def _one(client: httpx.AsyncClient, model: str, i: int, result: LoadResult, timeout: float) -> None:
    body = {"model": model, "prompt": f"hello {i}", "max_tokens": 8, "temperature": 0, "stream": i % 2 == 0}
    try:
        async with asyncio.timeout(timeout):
            if body["stream"]:
                async with client.stream("POST", "/v1/completions", json=body) as r:
                    text = (await r.aread()).decode(errors="replace")
                    status = r.status_code
            else:
                r = await client.post("/v1/completions", json=body)
                text, status = r.text, r.status_code
    except TimeoutError:
        result.hangs += 1
        return
    except httpx.HTTPError as exc:  # the gateway closed a connection: not a clean answer
        result.failures[f"transport {type(exc).__name__}"] += 1
        result.unclean.append(f"transport {type(exc).__name__}: {exc}")
        return
    if status == 200 and body["stream"] and '"error"' in text:
        err = next(json.loads(line[5:]) for line in text.splitlines() if line.startswith("data:") and '"error"' in line)
        result.failures[f"stream error {err['error'].get('code')}"] += 1
    elif status == 200:
        result.ok += 1
        for mark in result.ok_after:
            result.ok_after[mark] += 1
    else:
        try:
            code = r.json()["error"]["code"]
        except (ValueError, KeyError, TypeError):
            code = None
        result.failures[f"{status} {code}"] += 1
        if status != 503 or code is None:
            result.unclean.append(f"{status}: {text[:200]}")


async def run_load(url: str, model: str, clients: int, stop: asyncio.Event, result: LoadResult,
                   timeout: float = 30.0) -> LoadResult:
    """`clients` concurrent loops of completions (half streamed) until `stop` is set."""
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=timeout + 5, limits=limits) as client:
        async def loop(c: int) -> None:
            i = c
            while not stop.is_set():
                await _one(client, model, i, result, timeout)
                i += clients

        await asyncio.gather(*(loop(c) for c in range(clients)))
    return result


# ---- oversized bodies -----------------------------------------------------------------------------

def member_headers(served: Served, method: str, path: str) -> dict[str, str]:
    """Signature headers as a cluster member sends them (signed over an empty JSON body), with the secret the
    served cluster uses: the environment's, else the one `adapterd serve` made in its data dir."""
    from adapters_store.cluster_auth import SECRET_ENV, SECRET_FILE_ENV, ClusterSigner, load_secret

    given = any(os.environ.get(k) for k in (SECRET_ENV, SECRET_FILE_ENV))
    secret = load_secret() if given else load_secret(file=served.data_dir / "cluster-secret")
    return ClusterSigner(secret).request_headers(method, path, b"{}")


def chunked_flood(url: str, path: str, total: int, chunk: int = 256 * 1024, timeout: float = 60,
                  headers: dict[str, str] | None = None) -> tuple[int, int]:
    """POSTs a chunked JSON body of `total` bytes over a raw socket until the server answers or closes.
    Returns (HTTP status, bytes sent)."""
    host, port = url.removeprefix("http://").split(":")
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    sent = 0
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n{extra}"
                  "Transfer-Encoding: chunked\r\n\r\n".encode())
        payload = b'{"prompt": "' + b"x" * (chunk - 12)
        frame = f"{len(payload):x}\r\n".encode() + payload + b"\r\n"
        s.setblocking(False)
        try:
            while sent < total:
                try:
                    if s.recv(1, socket.MSG_PEEK):
                        break  # the server answered already
                except BlockingIOError:
                    pass
                view = memoryview(frame)
                while view:
                    try:
                        view = view[s.send(view):]
                    except BlockingIOError:
                        time.sleep(0.001)
                sent += len(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass
        s.setblocking(True)
        s.settimeout(timeout)
        head = b""
        try:
            while b"\r\n" not in head:
                part = s.recv(4096)
                if not part:
                    break
                head += part
        except (ConnectionResetError, TimeoutError):
            pass
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0
    return status, sent


# ---- schema fuzzing --------------------------------------------------------------------------------

def fuzz(url: str, examples_per_operation: int) -> dict:
    """schemathesis over the live gateway's OpenAPI: every operation, `examples_per_operation` generated
    cases each; returns the case count and every 5xx (method, path, status, body)."""
    import requests
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings

    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    cases, server_errors, statuses = 0, [], Counter()

    def run_operation(operation, session) -> None:
        @given(case=operation.as_strategy())
        @settings(max_examples=examples_per_operation, deadline=None, database=None,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        def check(case) -> None:
            nonlocal cases
            cases += 1
            r = case.call(base_url=url, session=session, timeout=60)
            statuses[f"{r.status_code // 100}xx"] += 1
            if r.status_code >= 500:
                server_errors.append((operation.method.upper(), operation.path, r.status_code, r.text[:300]))

        check()

    with requests.Session() as session:
        for result in schema.get_all_operations():
            run_operation(result.ok(), session)
    return {"cases": cases, "server_errors": server_errors, "by_class": dict(statuses)}
