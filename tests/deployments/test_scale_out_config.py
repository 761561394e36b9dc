"""The scale-out configuration (Kubernetes and serving work pools, MLflow on PostgreSQL + S3)
parses and agrees with the code. The Kubernetes side cannot run here; its process-pool twin
(deployments/scale-out/process.yaml) runs in tests/deployments/test_scale_out.py."""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

from slmops.config import ReleaseConfig, RollbackConfig, ServeFlowConfig

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
SCALE_OUT = ROOT / "deployments" / "scale-out"
PARAMETER_MODELS = {
    "flows/release.py:release": ReleaseConfig,
    "flows/rollback.py:rollback": RollbackConfig,
    "flows/serve.py:serve": ServeFlowConfig,
}
# Flows that start model servers run on the long-lived serving host, never in a release pod.
SERVING_FLOWS = {"flows/rollback.py:rollback", "flows/serve.py:serve"}


def _deployments(file: str) -> list[dict]:
    return yaml.safe_load((SCALE_OUT / file).read_text())["deployments"]


@pytest.mark.parametrize("file", ["prefect.yaml", "process.yaml"])
def test_scale_out_deployments_validate_against_the_flows(file):
    spec = yaml.safe_load((SCALE_OUT / file).read_text())
    assert spec["prefect-version"] == version("prefect")
    for deployment in spec["deployments"]:
        entrypoint = deployment["entrypoint"]
        assert (ROOT / entrypoint.split(":")[0]).exists(), entrypoint
        pool = deployment["work_pool"]["name"]
        if entrypoint in SERVING_FLOWS:
            assert pool == "slmops-serving", deployment["name"]
        else:
            assert pool in {"slmops-k8s", "slmops-process"}, deployment["name"]
        config = deployment.get("parameters", {}).get("config")
        if config is not None:
            PARAMETER_MODELS[entrypoint].model_validate(config)


def test_kubernetes_jobs_share_the_tracking_server_and_lock_through_prefect():
    for deployment in _deployments("prefect.yaml"):
        env = deployment["work_pool"]["job_variables"]["env"]
        assert env["MLFLOW_TRACKING_URI"].startswith(("http://", "https://"))
        assert env["SLMOPS_HOME"].startswith("/")
        assert env["SLMOPS_REGISTRY_LOCKS"] == "prefect"


def test_the_hub_token_comes_from_a_secret_block_not_the_file():
    release = next(d for d in _deployments("prefect.yaml") if d["name"] == "release-phi3-mini")
    token = release["work_pool"]["job_variables"]["env"]["HF_TOKEN"]
    assert token == "{{ prefect.blocks.secret.hf-token }}"
    # A served model is loaded from the store, never the hub: the serving host gets no token.
    for deployment in _deployments("prefect.yaml"):
        if deployment["entrypoint"] in SERVING_FLOWS:
            assert "HF_TOKEN" not in deployment["work_pool"]["job_variables"]["env"]


def test_every_production_model_has_a_scheduled_server_on_the_cluster():
    serve = next(d for d in _deployments("prefect.yaml") if d["name"] == "serve-champions")
    assert serve["schedules"][0]["active"] is True
    config = ServeFlowConfig.model_validate(serve["parameters"]["config"])
    release = next(d for d in _deployments("prefect.yaml") if d["name"] == "release-phi3-mini")
    released = ReleaseConfig.model_validate(release["parameters"]["config"])
    assert config.action == "start" and config.registry == released.registry
    assert set(config.serve.kinds) == set(released.serve.kinds)


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
    # psycopg2 named: SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3, not installed.
    assert "--backend-store-uri postgresql+psycopg2://" in mlflow["command"]
    assert "--artifacts-destination s3://" in mlflow["command"]
    assert mlflow["environment"]["MLFLOW_S3_ENDPOINT_URL"].startswith("http://minio:")
    assert services["prefect"]["image"].startswith(f"prefecthq/prefect:{version('prefect')}-")
    prefect_db = services["prefect"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert prefect_db.startswith("postgresql+asyncpg://") and prefect_db.endswith("/prefect")
    assert (SCALE_OUT / "initdb" / "prefect.sql").read_text().strip() == "CREATE DATABASE prefect;"
    # The bucket the artifacts go to is created before the MLflow server starts.
    bucket = mlflow["command"].split("--artifacts-destination s3://")[1].split("/")[0].strip('"')
    assert f"local/{bucket}" in services["create-bucket"]["entrypoint"]
    assert mlflow["depends_on"]["create-bucket"]["condition"] == "service_completed_successfully"
    # Published on loopback only: nothing is exposed beyond the host by default.
    for service in services.values():
        assert all(str(port).startswith("127.0.0.1:") for port in service.get("ports", []))


def test_image_pins_the_cpu_torch():
    dockerfile = (SCALE_OUT / "Dockerfile").read_text()
    assert "torch==2.13.0" in dockerfile
