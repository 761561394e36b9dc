"""prefect.yaml and deployments/: parameter sets validate, and a real server + worker runs a deployment."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from slmops.config import PruneConfig, ReleaseConfig, RollbackConfig, ServeFlowConfig

ROOT = Path(__file__).resolve().parents[2]
PREFECT_YAML = yaml.safe_load((ROOT / "prefect.yaml").read_text())
DEPLOYMENTS = {d["name"]: d for d in PREFECT_YAML["deployments"]}
PARAMETER_MODELS = {
    "flows/release.py:release": ReleaseConfig,
    "flows/rollback.py:rollback": RollbackConfig,
    "flows/serve.py:serve": ServeFlowConfig,
    "flows/prune.py:prune": PruneConfig,
}


@pytest.mark.unit
@pytest.mark.parametrize("profile", ["local", "phi3-mini"])
def test_parameter_sets_validate_and_match_prefect_yaml(profile):
    params = yaml.safe_load((ROOT / "deployments" / f"{profile}.yaml").read_text())
    config = ReleaseConfig.model_validate(params["config"])
    deployed = ReleaseConfig.model_validate(
        DEPLOYMENTS[f"release-{profile}"]["parameters"]["config"]
    )
    assert deployed == config


@pytest.mark.unit
def test_local_profile_uses_the_embedded_model_and_loopback():
    config = ReleaseConfig.model_validate(
        yaml.safe_load((ROOT / "deployments" / "local.yaml").read_text())["config"]
    )
    assert config.hub.source == "embedded" and config.serve.host == "127.0.0.1"


@pytest.mark.unit
@pytest.mark.parametrize("name", sorted(DEPLOYMENTS))
def test_every_deployment_has_a_loadable_entrypoint_and_valid_parameters(name):
    from prefect.flows import load_flow_from_entrypoint

    deployment = DEPLOYMENTS[name]
    flow = load_flow_from_entrypoint(str(ROOT / deployment["entrypoint"]))
    assert flow.__doc__ and "Args:" in flow.__doc__
    assert deployment["work_pool"]["name"] == "slmops-process"
    params = deployment.get("parameters", {}).get("config")
    if params is not None:
        PARAMETER_MODELS[deployment["entrypoint"]].model_validate(params)


@pytest.mark.unit
def test_a_typo_in_a_parameter_set_is_an_error():
    params = yaml.safe_load((ROOT / "deployments" / "local.yaml").read_text())["config"]
    params["serve"]["hots"] = "0.0.0.0"
    with pytest.raises(ValueError, match="hots"):
        ReleaseConfig.model_validate(params)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise TimeoutError(f"timed out waiting for {what}")


@pytest.mark.e2e
def test_deploy_and_run_through_a_worker_like_the_ui_run_button(tmp_path):
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_API_URL": api,
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{tmp_path / 'prefect.db'}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "true",
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_WORKER_PREFETCH_SECONDS": "1",
        "SLMOPS_HOME": str(tmp_path / "slmops"),
        "PWD": str(ROOT),
    }
    prefect = [sys.executable, "-m", "prefect"]
    logs = tmp_path / "logs"
    logs.mkdir()
    processes: list[subprocess.Popen] = []

    def start(args: list[str], log_name: str) -> subprocess.Popen:
        log = open(logs / log_name, "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            args, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        processes.append(proc)
        return proc

    try:
        start(
            [*prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"],
            "server.log",
        )

        def server_up() -> bool:
            try:
                return httpx.get(f"{api}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        _wait(server_up, 90, "prefect server /api/health")
        run = {"env": env, "cwd": ROOT, "capture_output": True, "text": True, "timeout": 180}
        pool = subprocess.run(
            [*prefect, "work-pool", "create", "slmops-process", "--type", "process"], **run
        )
        assert pool.returncode == 0, pool.stdout + pool.stderr
        deploy = subprocess.run([*prefect, "--no-prompt", "deploy", "--all"], **run)
        assert deploy.returncode == 0, deploy.stdout + deploy.stderr
        start([*prefect, "worker", "start", "--pool", "slmops-process"], "worker.log")

        with httpx.Client(base_url=api, timeout=30) as client:
            deployment = client.get("/deployments/name/serve/serve-stop").json()
            assert deployment["parameters"] == {"config": {"action": "stop"}}
            # What the UI's "Run" button sends: a flow run for the deployment, default parameters.
            flow_run = client.post(
                f"/deployments/{deployment['id']}/create_flow_run", json={}
            ).json()

            def finished():
                state = client.get(f"/flow_runs/{flow_run['id']}").json()["state"]
                return (
                    state
                    if state["type"] in {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
                    else None
                )

            state = _wait(finished, 180, "the deployment's flow run")
            assert state["type"] == "COMPLETED", (logs / "worker.log").read_text()[-3000:]
            artifacts = client.post(
                "/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [flow_run["id"]]}}}
            ).json()
            assert any(a["key"] == "servers" and a["type"] == "table" for a in artifacts)
    finally:
        for proc in reversed(processes):
            if proc.poll() is None:
                os.killpg(proc.pid, 15)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, 9)
