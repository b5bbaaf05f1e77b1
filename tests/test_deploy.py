"""The Kubernetes manifests (deploy/kubernetes/), as far as a machine without a cluster can
check them: every core object validates against Kubernetes 1.33's schemas
(kubernetes-validate, strict: an unknown field is an error), KEDA's ScaledObject is
checked by shape and its query against the metrics an API node really exports, and the
example overlay renders (by the small renderer below, the subset of kustomize these files
use: resources, namespace, images, patches merged by kind and name; ``kubectl kustomize``
is not on these machines)."""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import httpx
import kubernetes_validate
import pytest
import yaml

from tests.conftest import REPO
from tests.harness import running_server

KUBERNETES = "1.33.0"
DEPLOY = REPO / "deploy" / "kubernetes"
CORE_GROUPS = ("v1", "apps/", "policy/", "autoscaling/")


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def merged(base: Any, patch: Any) -> Any:
    """A strategic merge as these patches need it: maps merged key by key, lists of named
    items (containers, ports, env) merged by name, other values replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            out[key] = merged(base[key], value) if key in base else copy.deepcopy(value)
        return out
    if (
        isinstance(base, list)
        and isinstance(patch, list)
        and all(isinstance(i, dict) and "name" in i for i in patch)
    ):
        by_name = {item.get("name"): item for item in base if isinstance(item, dict)}
        out_list = [merged(by_name[i["name"]], i) if i["name"] in by_name else i for i in patch]
        return out_list + [item for item in base if item.get("name") not in {i["name"] for i in patch}]
    return copy.deepcopy(patch)


def render(folder: Path) -> list[dict[str, Any]]:
    """What ``kubectl kustomize folder`` makes of these files."""
    spec = documents(folder / "kustomization.yaml")[0]
    objects: list[dict[str, Any]] = []
    for resource in spec.get("resources", []):
        path = (folder / resource).resolve()
        objects += render(path) if path.is_dir() else documents(path)
    for patch_ref in spec.get("patches", []):
        [patch] = documents(folder / patch_ref["path"])
        [index] = [
            i
            for i, o in enumerate(objects)
            if (o["kind"], o["metadata"]["name"]) == (patch["kind"], patch["metadata"]["name"])
        ]
        objects[index] = merged(objects[index], patch)
    for labels in spec.get("labels", []):
        for obj in objects:
            obj["metadata"].setdefault("labels", {}).update(labels["pairs"])
    if "namespace" in spec:
        for obj in objects:
            obj["metadata"]["namespace"] = spec["namespace"]
    images = {image["name"]: image for image in spec.get("images", [])}
    for obj in objects:
        for pod in pod_specs(obj):
            for container in pod.get("initContainers", []) + pod.get("containers", []):
                name, _, tag = container["image"].partition(":")
                if name in images:
                    new = images[name]
                    container["image"] = f"{new.get('newName', name)}:{new.get('newTag', tag)}"
    return objects


def pod_specs(obj: dict[str, Any]) -> list[dict[str, Any]]:
    return [obj["spec"]["template"]["spec"]] if obj["kind"] == "Deployment" else []


def by_kind(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    [found] = [o for o in objects if (o["kind"], o["metadata"]["name"]) == (kind, name)]
    return found


@pytest.mark.parametrize("folder", [DEPLOY / "base", DEPLOY / "overlays" / "example"], ids=lambda p: p.name)
def test_every_core_object_validates_against_the_pinned_kubernetes(folder: Path) -> None:
    objects = render(folder)
    core = [o for o in objects if o["apiVersion"].startswith(CORE_GROUPS)]
    assert {o["kind"] for o in core} == {
        "ConfigMap",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "PersistentVolumeClaim",
    }
    for obj in core:
        kubernetes_validate.validate(obj, KUBERNETES, strict=True)  # raises, naming the field


def test_a_broken_manifest_is_caught() -> None:
    """The check above can fail: a misspelt field in a Deployment is refused."""
    api = copy.deepcopy(by_kind(render(DEPLOY / "base"), "Deployment", "fluxredux-api"))
    api["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(api, KUBERNETES, strict=True)


def test_the_api_is_probed_on_health_and_ready_and_the_workers_get_a_gpu_and_time_to_drain() -> None:
    objects = render(DEPLOY / "base")
    api = pod_specs(by_kind(objects, "Deployment", "fluxredux-api"))[0]["containers"][0]
    assert (api["livenessProbe"]["httpGet"]["path"], api["readinessProbe"]["httpGet"]["path"]) == (
        "/health",
        "/ready",
    )
    assert "--workers" in api["args"] and api["args"][api["args"].index("--workers") + 1] == "0"
    worker_pod = pod_specs(by_kind(objects, "Deployment", "fluxredux-worker"))[0]
    [worker] = worker_pod["containers"]
    assert worker["args"][0] == "worker" and worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    # A drain finishes the running prediction: the pod's grace must outlast one.
    assert worker_pod["terminationGracePeriodSeconds"] >= 300
    assert worker_pod["initContainers"][0]["args"][0] == "download"
    hpa = by_kind(objects, "HorizontalPodAutoscaler", "fluxredux-api")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "fluxredux-api"


def test_secrets_stay_out_of_the_config_map() -> None:
    objects = render(DEPLOY / "overlays" / "example")
    config = by_kind(objects, "ConfigMap", "fluxredux-config")["data"]
    secretive = ("SECRET", "TOKEN", "PASSWORD", "REDIS_URL", "ACCESS_KEY", "API_KEY")
    assert not [name for name in config if any(word in name for word in secretive)], config
    for deployment in ("fluxredux-api", "fluxredux-worker"):
        [container] = pod_specs(by_kind(objects, "Deployment", deployment))[0]["containers"]
        assert {"secretRef": {"name": "fluxredux-secrets"}} in container["envFrom"]


def test_the_overlay_renders_its_namespace_images_and_patches() -> None:
    objects = render(DEPLOY / "overlays" / "example")
    assert {o["metadata"]["namespace"] for o in objects} == {"fluxredux"}
    images = {c["image"] for o in objects for pod in pod_specs(o) for c in pod["containers"]}
    assert images == {
        "registry.example.com/fluxredux-api:0.1.0",
        "registry.example.com/fluxredux-worker:0.1.0",
    }
    config = by_kind(objects, "ConfigMap", "fluxredux-config")["data"]
    assert config["FLUXREDUX_STORAGE"] == "s3://my-bucket/fluxredux"
    assert config["FLUXREDUX_REDIS_PREFIX"] == "fluxredux:"  # the base's, kept
    scaler = by_kind(objects, "ScaledObject", "fluxredux-worker")["spec"]
    assert (scaler["minReplicaCount"], scaler["maxReplicaCount"]) == (0, 16)


def test_keda_scales_the_worker_deployment_on_metrics_the_api_really_exports(tmp_path: Path) -> None:
    objects = render(DEPLOY / "base")
    scaled = by_kind(objects, "ScaledObject", "fluxredux-worker")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    by_kind(objects, "Deployment", spec["scaleTargetRef"]["name"])  # it names a real Deployment
    assert spec["minReplicaCount"] == 0 and spec["maxReplicaCount"] >= 1
    [trigger] = spec["triggers"]
    assert trigger["type"] == "prometheus"
    assert set(trigger["metadata"]) >= {"serverAddress", "query", "threshold"}
    assert all(isinstance(value, str) for value in trigger["metadata"].values())  # KEDA wants strings
    query = trigger["metadata"]["query"]
    with running_server(tmp_path, run_worker=False) as api:
        api.create_id()  # one queued, so every series has a sample
        metrics = httpx.get(api.url + "/metrics").text
    assert "fluxredux_queue_depth 1.0" in metrics
    assert 'fluxredux_predictions{status="processing"}' in metrics
    assert (
        "max(fluxredux_queue_depth)" in query and 'max(fluxredux_predictions{status="processing"})' in query
    )


def test_the_compose_file_is_what_the_docs_quote_and_runs_api_nodes_and_gpu_workers() -> None:
    compose_text = (REPO / "deploy" / "compose.yaml").read_text()
    assert f"```yaml\n{compose_text}```" in (REPO / "docs" / "deploy.md").read_text()
    services = yaml.safe_load(compose_text)["services"]
    assert {"redis", "api1", "api2", "worker0", "worker1"} <= set(services)
    assert "--workers" in services["api1"]["command"]
    assert services["worker0"]["command"][0] == "worker"
    for service in ("api1", "worker0"):  # each built from its image's Dockerfile, which exists
        build = services[service]["build"]
        assert (REPO / "deploy" / build["context"] / build["dockerfile"]).resolve().is_file(), build
    assert services["api1"]["build"]["dockerfile"].endswith("api.Dockerfile")
    assert services["worker0"]["build"]["dockerfile"].endswith("worker.Dockerfile")


# --- the images: linted without a Docker daemon ------------------------------------------


def dockerfile(name: str) -> list[tuple[str, str]]:
    """(instruction, arguments) of ``deploy/docker/<name>``, continuation lines joined."""
    text = (REPO / "deploy" / "docker" / name).read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def resolved_bases(steps: list[tuple[str, str]]) -> list[str]:
    """Each stage's base image, its ARG defaults filled in."""
    defaults = dict(arg.split("=", 1) for kind, arg in steps if kind == "ARG" and "=" in arg)
    bases = []
    for kind, arg in steps:
        if kind == "FROM":
            image = arg.split()[0]
            for name, value in defaults.items():
                image = image.replace("${" + name + "}", value)
            bases.append(image)
    return bases


@pytest.mark.parametrize("name", ["api.Dockerfile", "worker.Dockerfile"])
def test_each_image_is_multi_stage_pinned_and_runs_as_a_user(name: str) -> None:
    steps = dockerfile(name)
    bases = resolved_bases(steps)
    assert len(bases) == 2, bases  # build, then a runtime stage without the build's leftovers
    for base in bases:
        repository, _, tag = base.rpartition(":")
        assert repository and tag and tag != "latest" and any(c.isdigit() for c in tag), base
    final = steps[max(i for i, (kind, _) in enumerate(steps) if kind == "FROM") :]
    users = [arg for kind, arg in final if kind == "USER"]
    assert users and users[-1] not in ("root", "0"), users
    assert any(kind == "ENTRYPOINT" and "fluxredux" in arg for kind, arg in final)


def test_the_api_image_has_no_torch_and_the_worker_s_installs_it_first() -> None:
    api_runs = " ".join(arg for kind, arg in dockerfile("api.Dockerfile") if kind == "RUN")
    assert "torch" not in api_runs and ".[server]" in api_runs and "[model]" not in api_runs
    worker_runs = [arg for kind, arg in dockerfile("worker.Dockerfile") if kind == "RUN"]
    torch_at = next(i for i, run in enumerate(worker_runs) if "torch==" in run)
    model_at = next(i for i, run in enumerate(worker_runs) if ".[model]" in run)
    assert torch_at < model_at  # else pip would pull whatever torch build it likes


# --- the metrics an autoscaler reads --------------------------------------------------------


def sample(metrics: str, series: str) -> float:
    [line] = [line for line in metrics.splitlines() if line.startswith(series + " ")]
    return float(line.rsplit(" ", 1)[1])


def test_every_api_node_exports_what_an_autoscaler_needs(tmp_path: Path) -> None:
    from fluxredux.pipeline.fake import FakeModel

    with running_server(tmp_path, model=FakeModel(step_seconds=0.4)) as api:
        running = api.create_id(num_inference_steps=4)
        waiting = api.create_id()
        deadline = time.monotonic() + 20
        while api.get(running)["status"] != "processing" and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # the waiting one has waited a while now
        metrics = httpx.get(api.url + "/metrics").text
        assert sample(metrics, "fluxredux_queue_depth") == 1
        assert sample(metrics, "fluxredux_oldest_queued_age_seconds") >= 0.3
        in_flight = [line for line in metrics.splitlines() if line.startswith("fluxredux_worker_in_flight{")]
        assert len(in_flight) == 1 and in_flight[0].endswith(" 1.0"), in_flight
        assert sample(metrics, 'fluxredux_workers{state="ready"}') == 1
        assert sample(metrics, 'fluxredux_workers{state="failed"}') == 0
        assert api.get(waiting, wait=30)["status"] == "success"
        metrics = httpx.get(api.url + "/metrics").text
        assert sample(metrics, "fluxredux_oldest_queued_age_seconds") == 0
        # One per successful prediction (the fake model reports its denoise time as 0).
        assert sample(metrics, "fluxredux_step_seconds_count") == 2
