"""The Ray Serve config file and the KubeRay RayService example (valid YAML, valid Serve schema, valid prefix-serve
settings, consistent with each other) and the launcher's checks; no cluster needed."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.settings import Settings

pytest.importorskip("ray.serve", reason="needs the ray extra: pip install -e '.[ray]'")

from ray.serve.schema import ServeDeploySchema  # noqa: E402

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "ray"


def check_serve_config(config: dict[str, Any]) -> Settings:
    schema = ServeDeploySchema.model_validate(config)
    (app,) = schema.applications
    assert app.route_prefix == "/"
    module, _, attr = app.import_path.partition(":")
    assert callable(getattr(importlib.import_module(module), attr))
    return Settings(**(app.args or {}))


def test_serve_config_is_valid() -> None:
    settings = check_serve_config(yaml.safe_load((DEPLOY / "serve-config.yaml").read_text()))
    assert settings.replicas >= 1 and settings.prefix_dir.is_absolute()


def test_rayservice_manifest_is_valid_and_consistent() -> None:
    documents = list(yaml.safe_load_all((DEPLOY / "rayservice.yaml").read_text()))
    kinds = {doc["kind"]: doc for doc in documents}
    assert set(kinds) == {"RayService", "PersistentVolumeClaim"}
    service = kinds["RayService"]
    assert service["apiVersion"] == "ray.io/v1"
    settings = check_serve_config(yaml.safe_load(service["spec"]["serveConfigV2"]))

    cluster = service["spec"]["rayClusterConfig"]
    groups = cluster["workerGroupSpecs"]
    gpus = sum(int(group["rayStartParams"]["num-gpus"]) * int(group["replicas"]) for group in groups)
    assert settings.ray_gpus_per_replica and settings.replicas * settings.ray_gpus_per_replica == gpus
    claim = kinds["PersistentVolumeClaim"]["metadata"]["name"]
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:  # every pod mounts the one shared store where the settings say, and shared memory for Ray
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        mounts = {m["mountPath"]: m["name"] for c in pod["spec"]["containers"] for m in c["volumeMounts"]}
        assert volumes[mounts[str(settings.prefix_dir)]]["persistentVolumeClaim"]["claimName"] == claim
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    assert kinds["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]


def test_serve_app_module_keeps_real_annotations() -> None:
    """Serve pickles the deployment classes: postponed annotations would turn FastAPI bodies into query params."""
    import __future__

    import service.scaleout.app as serve_app

    assert getattr(serve_app, "annotations", None) is not __future__.annotations


def test_launcher_refuses_replicas_the_cluster_cannot_place() -> None:
    from service.scaleout.launch import resource_problem

    settings = Settings(replicas=3)
    problem = resource_problem(settings, {"CPU": 2.0}, gpus_per_replica=0)
    assert problem is not None and "3 replicas x 1 CPU = 3 CPUs" in problem and "has 2" in problem
    assert resource_problem(Settings(replicas=2), {"CPU": 2.0}, gpus_per_replica=0) is None
    assert "GPU" in (resource_problem(Settings(replicas=2), {"CPU": 8.0, "GPU": 1.0}, gpus_per_replica=1) or "")
