"""Release homes: a `SLMOPS_HOME` that releases run in as operators run them.

A release is `python -m flows.release '<json>'` in its own process group, with `HF_TOKEN` set
to a secret that must show up nowhere, reporting to the session's Prefect test server. The
session's shared release (the `released` fixture in conftest) is one; a test that changes what
it serves puts the champions back with `ReleaseHome.restore_serving`.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from slmops.config import ServeFlowConfig, Settings, WrapperKind
from slmops.promotion import CHAMPION, RegistryState
from slmops.store import ModelStore
from tasks.registry import read_state
from tasks.serving import ServerHandle, ServerStatus, status_of

REPO_ROOT = Path(__file__).resolve().parents[2]
# A fake HF token, new each session: whatever holds it leaked it.
TOKEN = f"hf_secret_{secrets.token_hex(12)}"
RELEASE_TIMEOUT_S = 600
# `mlflow.set_tracking_uri` exports MLFLOW_TRACKING_URI, and Settings.from_env prefers it to
# SLMOPS_HOME: whatever store an earlier test pointed MLflow at must not leak into a release.
MLFLOW_URI_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


@dataclass(frozen=True)
class ReleaseHome:
    """A release home; `names` are the registered models of its first release, by kind."""

    settings: Settings
    env: dict[str, str]
    outputs: Path
    names: dict[WrapperKind, str]
    machine_home: Path  # HOME of the new user's machine the first release ran on

    def new_machine_env(self) -> dict[str, str]:
        """README command 1's environment on a new user's machine: an empty HOME and nothing
        of Prefect's set, so the release starts a temporary Prefect server of its own, which
        must create its database. HF_TOKEN is set (it must show up nowhere). The one thing
        shared with the session is the embedded model's build cache: the build is
        deterministic, and test_tiny_model checks its progress lines."""
        keep = ("PATH", "LANG", "LC_ALL", "TMPDIR", "SLMOPS_EMBEDDED_CACHE")
        return {
            **{k: os.environ[k] for k in keep if k in os.environ},
            "HOME": str(self.machine_home),
            "SLMOPS_HOME": str(self.settings.home),
            "HF_TOKEN": TOKEN,
        }

    @property
    def store(self) -> ModelStore:
        return ModelStore.from_settings(self.settings)

    @property
    def client(self) -> MlflowClient:
        return self.store.client()

    def registry(self) -> dict[str, RegistryState]:
        return {name: read_state(self.client, name) for name in self.names.values()}

    def status(self, kind: WrapperKind) -> ServerStatus:
        return status_of(self.settings.servers_dir, self.names[kind])

    def handle(self, kind: WrapperKind) -> ServerHandle:
        """The handle of the server now serving `kind`, which must be serving."""
        status = self.status(kind)
        assert status.state == "serving" and status.handle is not None, status
        return status.handle

    def champion_uri(self, kind: WrapperKind) -> str:
        version = self.client.get_model_version_by_alias(self.names[kind], CHAMPION).version
        return f"models:/{self.names[kind]}/{version}"

    def start(self, label: str, config: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        """`python -m flows.release <config>` (JSON or a YAML file) in its own process group,
        in `env` (default: this home's, reporting to the session's Prefect server); output in
        `outputs`."""
        with open(self.outputs / f"{label}.log", "w") as output:
            return subprocess.Popen(
                [sys.executable, "-m", "flows.release", config],
                cwd=REPO_ROOT,
                env=env if env is not None else self.env,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def finish(self, label: str, proc: subprocess.Popen) -> dict[str, Any]:
        """Wait for a release started by `start`; its report (the JSON the module prints last)."""
        try:
            proc.wait(timeout=RELEASE_TIMEOUT_S)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        output = (self.outputs / f"{label}.log").read_text()
        assert proc.returncode == 0, output[-5000:]
        report, _ = json.JSONDecoder().raw_decode(output[output.rindex("\n{\n") + 1 :])
        return report

    def restore_serving(self) -> None:
        """Serve every champion again, with the front door (the serve flow's `start`): a dead
        or stale server is replaced, a healthy one kept."""
        from flows.serve import serve

        with pytest.MonkeyPatch.context() as patch:
            point_flows_at(self, patch)
            serve(ServeFlowConfig(action="start"))
        for kind in self.names:
            assert self.handle(kind).model_uri == self.champion_uri(kind)


def point_flows_at(home: ReleaseHome, monkeypatch: pytest.MonkeyPatch) -> None:
    """Flows called in this process see `home` as the release subprocesses do."""
    monkeypatch.setenv("SLMOPS_HOME", str(home.settings.home))
    for variable in MLFLOW_URI_VARIABLES:
        monkeypatch.delenv(variable, raising=False)


def release_env(root: Path, prefect_api_url: str) -> dict[str, str]:
    """The environment of a release in `root`: HF_TOKEN set, reporting to `prefect_api_url`."""
    return {
        **{k: v for k, v in os.environ.items() if k not in MLFLOW_URI_VARIABLES},
        "SLMOPS_HOME": str(root),
        "HF_TOKEN": TOKEN,
        # The session's Prefect server: no temporary server per run, and one database holding
        # every run's records and logs (searched for the token by test_reliability).
        "PREFECT_API_URL": prefect_api_url,
        "PREFECT_LOGGING_TO_API_ENABLED": "true",
    }
