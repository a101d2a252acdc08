"""The Kubernetes manifests in deploy/kubernetes/, checked without a cluster: against the
Kubernetes API schemas (kubernetes-validate, strict: no unknown fields), and against the
server itself (settings that exist, probe routes that answer, a grace that covers the
drain, an autoscaler on a metric that /metrics serves)."""

from __future__ import annotations

import copy
import re
import tomllib
from pathlib import Path
from typing import Any

import httpx
import kubernetes_validate
import pytest
import yaml

from fabricai_trio.settings import Settings

from .server_process import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "kubernetes"
VERSION = "1.30.0"  # the oldest release with the preStop `sleep` action
SETTINGS = {name.upper() for name in Settings.model_fields}


def documents(name: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]


def resource(kind: str) -> dict[str, Any]:
    for path in sorted(K8S.glob("*.yaml")):
        for doc in documents(path.name):
            if doc.get("kind") == kind:
                return doc
    raise AssertionError(f"no {kind} in {K8S}")


def container() -> dict[str, Any]:
    spec: dict[str, Any] = resource("Deployment")["spec"]["template"]["spec"]
    found: dict[str, Any] = spec["containers"][0]
    return found


@pytest.mark.parametrize("name", ["fabricai.yaml", "redis.yaml", "scaling-hpa.yaml"])
def test_manifests_validate_against_the_kubernetes_schemas(name: str) -> None:
    for doc in documents(name):
        kubernetes_validate.validate(doc, VERSION, strict=True)


def test_the_validator_rejects_a_broken_manifest() -> None:
    broken = copy.deepcopy(resource("Deployment"))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"][
        "paht"] = "/readyz"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSION, strict=True)


def test_kustomization_lists_the_base_and_the_image() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert set(kustomization["resources"]) == {"fabricai.yaml", "redis.yaml"}
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert kustomization["images"][0]["newTag"] == version
    assert container()["image"] == f"fabricai-trio:{version}"


def test_environment_names_are_settings() -> None:
    config = resource("ConfigMap")["data"]
    names = set(config) | {env["name"] for env in container().get("env", [])}
    assert names <= SETTINGS, names - SETTINGS
    assert config["REDIS_URL"].startswith("redis://fabricai-redis:")
    assert int(config["PORT"]) == container()["ports"][0]["containerPort"]


def test_grace_covers_prestop_drain_and_shutdown() -> None:
    """SIGKILL must never cut the drain: preStop + DRAIN + SHUTDOWN grace fit in the
    termination grace period."""
    config = resource("ConfigMap")["data"]
    pod = resource("Deployment")["spec"]["template"]["spec"]
    pre_stop = container()["lifecycle"]["preStop"]["sleep"]["seconds"]
    needed = pre_stop + float(config["DRAIN_TIMEOUT_SECONDS"]) + float(
        config["SHUTDOWN_GRACE_SECONDS"])
    assert pod["terminationGracePeriodSeconds"] > needed


def test_probes_answer_on_a_real_server(server: ServerProcess) -> None:
    probes = {name: container()[name]["httpGet"]["path"]
              for name in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert probes == {"startupProbe": "/livez", "livenessProbe": "/livez",
                      "readinessProbe": "/readyz"}
    for path in set(probes.values()):
        assert httpx.get(f"{server.url}{path}").status_code == 200


def test_autoscalers_use_a_metric_the_server_exports(server: ServerProcess) -> None:
    exported = httpx.get(f"{server.url}/metrics").text
    keda = documents("scaling-keda.yaml")[0]
    assert keda["apiVersion"] == "keda.sh/v1alpha1" and keda["kind"] == "ScaledObject"
    assert keda["spec"]["scaleTargetRef"]["name"] == resource("Deployment")["metadata"]["name"]
    (trigger,) = keda["spec"]["triggers"]
    assert trigger["type"] == "prometheus" and float(trigger["metadata"]["threshold"]) > 0
    hpa = resource("HorizontalPodAutoscaler")
    (metric,) = hpa["spec"]["metrics"]
    names = set(re.findall(r"fabricai_[a-z_]+", trigger["metadata"]["query"]))
    names.add(metric["pods"]["metric"]["name"])
    for name in names:
        assert re.search(rf"^# TYPE {name} gauge$", exported, re.MULTILINE), name
