"""The scale-out configuration (Kubernetes work pool, MLflow on PostgreSQL + S3) parses and agrees
with the code, even though it cannot run here."""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

from slmops.config import ReleaseConfig, RollbackConfig

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[1]
SCALE_OUT = ROOT / "deployments" / "scale-out"
PARAMETER_MODELS = {
    "flows/release.py:release": ReleaseConfig,
    "flows/rollback.py:rollback": RollbackConfig,
}


def test_kubernetes_deployments_validate_against_the_flows():
    spec = yaml.safe_load((SCALE_OUT / "prefect.yaml").read_text())
    assert spec["prefect-version"] == version("prefect")
    for deployment in spec["deployments"]:
        entrypoint = deployment["entrypoint"]
        assert (ROOT / entrypoint.split(":")[0]).exists(), entrypoint
        job = deployment["work_pool"]["job_variables"]
        assert deployment["work_pool"]["name"] == "slmops-k8s"
        assert job["env"]["MLFLOW_TRACKING_URI"].startswith(
            ("http://", "https://", "postgresql://")
        )
        assert job["env"]["SLMOPS_HOME"].startswith("/")
        assert "HF_TOKEN" not in job["env"], (
            "secrets belong in the cluster secret, not in the deployment"
        )
        config = deployment.get("parameters", {}).get("config")
        if config is not None:
            PARAMETER_MODELS[entrypoint].model_validate(config)


def test_release_on_the_cluster_does_not_serve_from_the_release_pod():
    spec = yaml.safe_load((SCALE_OUT / "prefect.yaml").read_text())
    release = next(d for d in spec["deployments"] if d["entrypoint"] == "flows/release.py:release")
    assert ReleaseConfig.model_validate(release["parameters"]["config"]).serve.enabled is False


def test_shared_services_use_postgres_and_s3_with_the_pinned_versions():
    compose = yaml.safe_load((SCALE_OUT / "compose.yaml").read_text())
    services = compose["services"]
    assert {"postgres", "minio", "mlflow", "prefect"} <= set(services)
    mlflow = services["mlflow"]
    assert mlflow["image"].endswith(f":v{version('mlflow')}")
    assert "--backend-store-uri postgresql://" in mlflow["command"]
    assert "--artifacts-destination s3://" in mlflow["command"]
    assert mlflow["environment"]["MLFLOW_S3_ENDPOINT_URL"].startswith("http://minio:")
    assert services["prefect"]["image"].startswith(f"prefecthq/prefect:{version('prefect')}-")
    # Published on loopback only: nothing is exposed beyond the host by default.
    for service in services.values():
        assert all(str(port).startswith("127.0.0.1:") for port in service.get("ports", []))


def test_image_pins_the_cpu_torch():
    dockerfile = (SCALE_OUT / "Dockerfile").read_text()
    assert "torch==2.13.0" in dockerfile
