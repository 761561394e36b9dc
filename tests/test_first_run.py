"""A new user's first run: README command 1 on a machine with an empty HOME.

The release runs as the README runs it, `python -m flows.release deployments/local.yaml`, in a
subprocess whose HOME, PREFECT_HOME and SLMOPS_HOME are empty folders, with none of the test
session's Prefect settings: Prefect's temporary server must create its database from nothing,
as on a fresh machine. The one thing shared with the session is the embedded model's build cache
(SLMOPS_EMBEDDED_CACHE): the build is deterministic, and building it again would only add a
minute (its progress lines are checked in test_tiny_model).

Then the state folder is deleted, with a real Phi-3-mini release registered in the new store,
and a second release must pass without touching it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import yaml

from slmops.config import PHI3_REPO_ID, ReleaseConfig, Settings, WrapperKind
from slmops.store import ModelStore
from tasks.registry import SOURCE_REPO_TAG, read_state

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parents[1]
RELEASE_TIMEOUT_S = 600
LOCAL = ReleaseConfig.model_validate(
    yaml.safe_load((REPO_ROOT / "deployments" / "local.yaml").read_text())["config"]
)
REAL_NAMES = [f"phi3-mini-{kind.value}" for kind in WrapperKind]


def new_machine_env(root: Path, embedded_cache: Path) -> dict[str, str]:
    """The environment of a fresh machine: an empty HOME and nothing of Prefect's set."""
    home = root / "home"
    home.mkdir()
    keep = ("PATH", "LANG", "LC_ALL", "TMPDIR")
    return {
        **{k: os.environ[k] for k in keep if k in os.environ},
        "HOME": str(home),
        "SLMOPS_HOME": str(root / "slmops"),
        "SLMOPS_EMBEDDED_CACHE": str(embedded_cache),
    }


def run_release(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flows.release", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=RELEASE_TIMEOUT_S,
        check=False,
    )


def stop_servers(slmops_home: Path) -> None:
    """Kill the servers a release left running (each in its own process group)."""
    for state in (slmops_home / "servers").glob("*.json"):
        pid = json.loads(state.read_text()).get("pid")
        if pid and psutil.pid_exists(pid):
            os.killpg(pid, signal.SIGKILL)


def register_real_phi3(store: ModelStore, artifacts: Path) -> dict[str, object]:
    """A Production release of the real Phi-3-mini, as the hub flow would have registered it
    (the registry entries only: a local release must not touch them)."""
    client = store.client()
    for name in REAL_NAMES:
        client.create_registered_model(name, tags={SOURCE_REPO_TAG: PHI3_REPO_ID})
        version = client.create_model_version(
            name, source=str(artifacts / name), tags={SOURCE_REPO_TAG: PHI3_REPO_ID}
        )
        client.transition_model_version_stage(name, version.version, "Production")
        client.set_registered_model_alias(name, "champion", version.version)
    return {name: read_state(client, name) for name in REAL_NAMES}


def test_a_fresh_machine_releases_first_time_cleanly_and_survives_a_deleted_state_folder(
    tmp_path, embedded_repos
):
    embedded_cache = next(iter(embedded_repos.values())).parent
    env = new_machine_env(tmp_path, embedded_cache)
    slmops_home = Path(env["SLMOPS_HOME"])
    try:
        first = run_release(env, "deployments/local.yaml")
        output = first.stdout + first.stderr
        assert first.returncode == 0, output[-6000:]
        assert "Traceback" not in output, output[-6000:]
        for kind in LOCAL.serve.kinds:
            assert f"{LOCAL.registry.model_name(kind)} v1 at http://127.0.0.1:" in output
        assert "'The capital of Spain is Madrid.'" in output
        # Prefect's task results live in the state folder, not in ~/.prefect.
        assert any((slmops_home / "prefect-results").iterdir())
        assert not (Path(env["HOME"]) / ".prefect" / "storage").exists()
    finally:
        stop_servers(slmops_home)

    shutil.rmtree(slmops_home)
    store = ModelStore.from_settings(Settings.from_env({"SLMOPS_HOME": env["SLMOPS_HOME"]}))
    slmops_home.mkdir()
    real_before = register_real_phi3(store, tmp_path / "real-artifacts")

    # Prefect's result cache went with the folder, so nothing hands out the deleted models
    # (test_caching covers cached results that outlive their models).
    second = run_release(
        env, json.dumps({**LOCAL.model_dump(mode="json"), "serve": {"enabled": False}})
    )
    output = second.stdout + second.stderr
    assert second.returncode == 0, output[-6000:]
    stdout = "\n" + second.stdout
    report, _ = json.JSONDecoder().raw_decode(stdout[stdout.rindex("\n{\n") + 1 :])
    assert all(o["promoted"] for o in report["outcomes"]), report
    client = store.client()
    for outcome in report["outcomes"]:
        assert outcome["registered_model"].startswith("tiny-phi3-")
        client.get_logged_model(outcome["model_uri"].removeprefix("models:/"))  # it exists
    # The local release left the real model's registered models as they were.
    assert {name: read_state(client, name) for name in REAL_NAMES} == real_before
