"""A new user's first run: README command 1 on a machine with an empty HOME, then the state
folder deleted and a release again.

The session's shared release (`released` in conftest) is that first run: `python -m
flows.release deployments/local.yaml` in a subprocess whose HOME is an empty folder, with none
of the test session's Prefect settings, so Prefect's temporary server must create its database
from nothing, as on a fresh machine. Its output is checked here.

The state-folder test runs last in the session (it deletes the shared release's folder): with
a real Phi-3-mini release registered in the new store, a second release must pass without
touching it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from slmops.config import ReleaseConfig
from slmops.servers import FRONT_DOOR
from tasks.serving import served_names, stop_server
from tests.support.release_home import REPO_ROOT, ReleaseHome

pytestmark = pytest.mark.e2e

LOCAL = ReleaseConfig.model_validate(
    yaml.safe_load((REPO_ROOT / "deployments" / "local.yaml").read_text())["config"]
)


def test_readme_command_1_releases_first_time_on_a_new_machine_and_prints_cleanly(
    released: ReleaseHome,
):
    output = (released.outputs / "first.log").read_text()  # the run exited 0 (`released`)
    assert "Traceback" not in output, output[-6000:]
    for kind in LOCAL.serve.kinds:
        assert f"{LOCAL.registry.model_name(kind)} v1 at http://127.0.0.1:" in output
    assert "'The capital of Spain is Madrid.'" in output
    # Prefect's task results live in the state folder, not in ~/.prefect.
    assert any((released.settings.home / "prefect-results").iterdir())
    assert (released.machine_home / ".prefect").is_dir()  # its own temporary server's database
    assert not (released.machine_home / ".prefect" / "storage").exists()


def real_phi3(*args: str) -> dict[str, object]:
    """tests.support.real_phi3 in a subprocess (see there why)."""
    done = subprocess.run(
        [sys.executable, "-m", "tests.support.real_phi3", *args],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.deletes_shared_release
def test_a_deleted_state_folder_releases_again_and_leaves_the_real_model_alone(
    released: ReleaseHome, tmp_path: Path
):
    servers = released.settings.servers_dir
    for name in [FRONT_DOOR, *served_names(servers)]:
        stop_server(servers, name)
    slmops_home = released.settings.home
    shutil.rmtree(slmops_home)
    slmops_home.mkdir()
    tracking_uri = released.settings.tracking_uri
    real_before = real_phi3("register", tracking_uri, str(tmp_path / "real-artifacts"))["real"]

    # Prefect's result cache went with the folder, so nothing hands out the deleted models
    # (test_caching covers cached results that outlive their models).
    config = {**LOCAL.model_dump(mode="json"), "serve": {"enabled": False}}
    second = released.start("after-rm", json.dumps(config), env=released.new_machine_env())
    report = released.finish("after-rm", second)
    assert all(o["promoted"] for o in report["outcomes"]), report
    assert all(o["registered_model"].startswith("tiny-phi3-") for o in report["outcomes"])
    model_ids = [o["model_uri"].removeprefix("models:/") for o in report["outcomes"]]
    after = real_phi3("inspect", tracking_uri, *model_ids)
    assert sorted(after["logged_models_found"]) == sorted(model_ids)  # they exist
    # The local release left the real model's registered models as they were.
    assert after["real"] == real_before
