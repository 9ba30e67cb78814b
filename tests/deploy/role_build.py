"""The stand-in for `docker build` (no Docker engine here): reads a role's Dockerfile and does what it does,
in a temporary folder: copies exactly the paths its COPY lines name, then runs its `pip install` lines in a
fresh venv (the CUDA/CPU `--extra-index-url` is dropped: torch==2.13.0 comes from the machine's local CPU
wheel). The installer is uv when present (same requirements, seconds instead of minutes), else pip."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@dataclass
class DockerfilePlan:
    copies: list[str]  # paths relative to the build context, in order
    installs: list[list[str]]  # the arguments after `pip install`, one list per pip command
    entrypoint: list[str]


def _logical_lines(text: str) -> list[str]:
    lines, current = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        lines.append(current + line)
        current = ""
    return lines


def _pip_args(segment: str) -> list[str] | None:
    words = shlex.split(segment)
    if words[:2] != ["pip", "install"]:
        return None
    args, skip = [], False
    for w in words[2:]:
        if skip:
            skip = False
        elif w == "--extra-index-url":
            skip = True
        else:
            args.append(w)
    return args


def read_plan(dockerfile: Path) -> DockerfilePlan:
    copies, installs, entrypoint = [], [], []
    for line in _logical_lines(dockerfile.read_text()):
        op, _, rest = line.partition(" ")
        if op == "COPY":
            *sources, _dest = shlex.split(rest)
            copies += [s.rstrip("/") for s in sources]
        elif op == "RUN":
            installs += [a for a in (_pip_args(s) for s in rest.split("&&")) if a is not None]
        elif op == "ENTRYPOINT":
            entrypoint = json.loads(rest)
    return DockerfilePlan(copies, installs, entrypoint)


@dataclass
class BuiltRole:
    role: str
    app: Path  # the image's WORKDIR: the copied folders
    python: Path  # the venv's interpreter
    entrypoint: list[str]  # ENTRYPOINT with `python` replaced by the venv's
    seconds: float  # how long the build took

    def run(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.python), *args], cwd=self.app, env=role_env(), capture_output=True,
                              text=True, timeout=120, **kw)


def role_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a role's process: nothing of the test's venv or source tree."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    return {**env, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(extra or {})}


def _find_links() -> str:
    if os.environ.get("PIP_FIND_LINKS"):
        return os.environ["PIP_FIND_LINKS"]
    r = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.find-links"], capture_output=True,
                       text=True)
    return r.stdout.strip() if r.returncode == 0 else ""


def _installer(venv: Path) -> list[str]:
    uv = shutil.which("uv", path=str(BIN)) or shutil.which("uv")
    if uv:
        links = _find_links()
        return [uv, "pip", "install", "--quiet", "--python", str(venv / "bin" / "python"),
                *(["--find-links", links] if links else [])]
    return [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-compile"]


def build_role(role: str, dest: Path) -> BuiltRole:
    """Builds `docker/Dockerfile.{role}` into `dest` (app/ and venv/)."""
    start = time.monotonic()
    plan = read_plan(ROOT / "docker" / f"Dockerfile.{role}")
    app, venv = dest / "app", dest / "venv"
    app.mkdir(parents=True)
    for src in plan.copies:
        source = ROOT / src
        if source.is_dir():
            shutil.copytree(source, app / src, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(source, app / src)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    if not shutil.which("uv", path=str(BIN)) and not shutil.which("uv"):
        subprocess.run([str(venv / "bin" / "python"), "-m", "ensurepip", "-q"], check=True)
    for args in plan.installs:
        r = subprocess.run([*_installer(venv), *args], cwd=app, env=role_env(), capture_output=True, text=True,
                           timeout=900)
        assert r.returncode == 0, f"{role}: pip install {' '.join(args)} failed:\n{r.stdout[-2000:]}{r.stderr[-3000:]}"
    python = venv / "bin" / "python"
    entry = [str(python) if w == "python" else w for w in plan.entrypoint]
    return BuiltRole(role, app, python, entry, time.monotonic() - start)
