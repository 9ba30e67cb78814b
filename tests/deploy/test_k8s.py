"""Kubernetes manifests (docker/k8s/): the kustomize base and the GPU overlay render with `kubectl kustomize`
(kubectl's built-in kustomize), every rendered object validates offline against the Kubernetes schemas
(PyPI `kubernetes-validate`, strict: unknown fields are errors), and the tests read the rendered objects:
probes, resources, secrets, the worker's preStop drain, the GPU requests, PDBs, the HPA, Redis AOF."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S_VERSION = "1.30.0"
SECRET = "adapterd-secrets"


def render(path: str) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    r = subprocess.run([kubectl, "kustomize", str(ROOT / path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return [d for d in yaml.safe_load_all(r.stdout) if d]


def by_kind(objects: list[dict]) -> dict[tuple[str, str], dict]:
    return {(o["kind"], o["metadata"]["name"]): o for o in objects}


def container(objects, kind: str, name: str) -> dict:
    return by_kind(objects)[(kind, name)]["spec"]["template"]["spec"]["containers"][0]


def secret_refs(c: dict) -> dict[str, str]:
    return {e["name"]: e["valueFrom"]["secretKeyRef"]["key"] for e in c.get("env", [])
            if "secretKeyRef" in e.get("valueFrom", {}) and e["valueFrom"]["secretKeyRef"]["name"] == SECRET}


@pytest.mark.parametrize("path", ["docker/k8s/base", "docker/k8s/overlays/gpu"])
def test_manifests_render_and_validate(path):
    import kubernetes_validate

    objects = render(path)
    assert len(objects) == 11
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {e.message} at {list(e.path)}")
        assert obj["metadata"].get("namespace", "adapterd") == "adapterd"


def test_base_objects():
    objects = render("docker/k8s/base")
    kinds = by_kind(objects)
    for expected in [("Deployment", "gateway"), ("Service", "gateway"), ("HorizontalPodAutoscaler", "gateway"),
                     ("Deployment", "worker"), ("Deployment", "trainer"), ("StatefulSet", "redis"),
                     ("Service", "redis"), ("PersistentVolumeClaim", "adapterd-data"),
                     ("PodDisruptionBudget", "gateway"), ("PodDisruptionBudget", "worker")]:
        assert expected in kinds, expected
    assert not any(o["kind"] == "Secret" for o in objects)  # created by the operator, never shipped
    hpa = kinds[("HorizontalPodAutoscaler", "gateway")]["spec"]
    assert hpa["scaleTargetRef"]["name"] == "gateway" and hpa["minReplicas"] >= 2
    assert kinds[("PodDisruptionBudget", "worker")]["spec"]["maxUnavailable"] == 1
    assert kinds[("PodDisruptionBudget", "gateway")]["spec"]["minAvailable"] == 1


def test_probes_resources_and_secrets():
    objects = render("docker/k8s/base")
    gateway, worker = container(objects, "Deployment", "gateway"), container(objects, "Deployment", "worker")
    trainer = container(objects, "Deployment", "trainer")
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert gateway["livenessProbe"]["httpGet"]["path"] == "/health"
    assert worker["readinessProbe"]["httpGet"]["path"] == "/ready"  # model loaded and registered
    assert worker["startupProbe"]["failureThreshold"] * worker["startupProbe"]["periodSeconds"] >= 300
    for c in (gateway, worker, trainer):
        assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"]
        refs = secret_refs(c)
        assert refs["ADAPTERD_CLUSTER_SECRET"] == "cluster-secret" and refs["REDIS_PASSWORD"] == "redis-password"
        url = next(e["value"] for e in c["env"] if e["name"] == "ADAPTERD_REDIS_URL")
        names = [e["name"] for e in c["env"]]
        assert url == "redis://:$(REDIS_PASSWORD)@redis:6379/0"
        assert names.index("REDIS_PASSWORD") < names.index("ADAPTERD_REDIS_URL")  # $(VAR) expands only then
    assert secret_refs(gateway)["ADAPTERD_API_KEYS"] == "api-keys"
    # workers advertise their pod IP, not a name that needs a Service
    assert "http://$(POD_IP):9000" in worker["args"]
    assert any(e["name"] == "POD_IP" and e["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
               for e in worker["env"])


def test_drain_on_termination():
    objects = render("docker/k8s/base")
    kinds = by_kind(objects)
    worker_pod = kinds[("Deployment", "worker")]["spec"]["template"]["spec"]
    worker = worker_pod["containers"][0]
    grace = float(worker["args"][worker["args"].index("--drain-grace") + 1])
    assert worker_pod["terminationGracePeriodSeconds"] > grace
    hook = " ".join(worker["lifecycle"]["preStop"]["exec"]["command"])
    assert "kill -TERM 1" in hook and "kill -0 1" in hook  # starts the drain and waits for the worker to exit
    assert kinds[("Deployment", "worker")]["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    gateway_pod = kinds[("Deployment", "gateway")]["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in gateway_pod["containers"][0]["env"]}
    assert gateway_pod["terminationGracePeriodSeconds"] > float(env["ADAPTERD_DRAIN_GRACE_S"])
    assert gateway_pod["containers"][0]["lifecycle"]["preStop"]
    assert kinds[("Deployment", "trainer")]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= 30


def test_redis_keeps_an_append_only_file_on_a_volume():
    objects = render("docker/k8s/base")
    redis = by_kind(objects)[("StatefulSet", "redis")]["spec"]
    c = redis["template"]["spec"]["containers"][0]
    assert c["args"][c["args"].index("--appendonly") + 1] == "yes" and "--requirepass" in c["args"]
    assert c["volumeMounts"][0]["mountPath"] == "/data"
    assert redis["volumeClaimTemplates"][0]["metadata"]["name"] == c["volumeMounts"][0]["name"]


def test_gpu_overlay():
    base, gpu = render("docker/k8s/base"), render("docker/k8s/overlays/gpu")
    cpu_worker, gpu_worker = container(base, "Deployment", "worker"), container(gpu, "Deployment", "worker")
    assert "nvidia.com/gpu" not in cpu_worker["resources"].get("limits", {})
    assert gpu_worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu_worker["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert gpu_worker["image"].endswith(":cuda")
    assert gpu_worker["args"][gpu_worker["args"].index("--device") + 1] == "cuda"
    assert gpu_worker["readinessProbe"] == cpu_worker["readinessProbe"]
    assert gpu_worker["lifecycle"] == cpu_worker["lifecycle"]
    pod = by_kind(gpu)[("Deployment", "worker")]["spec"]["template"]["spec"]
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert container(gpu, "Deployment", "gateway") == container(base, "Deployment", "gateway")
