"""Release runs that crash, are killed, or run at once; served models that die; a secret token.

Releases run as operators run them: `python -m flows.release '<json>'` subprocesses on one
`SLMOPS_HOME` (one SQLite MLflow store, lock folder and servers folder), reporting to the
session's Prefect test server, with `HF_TOKEN` set to a secret that must show up nowhere. The
home is the session's shared release (`released` in conftest), whose first release serves
Production; each test leaves the champions served, as it found them.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.settings import (
    PREFECT_RESULTS_LOCAL_STORAGE_PATH,
    PREFECT_SERVER_DATABASE_CONNECTION_URL,
)

from flows.serve import serve
from offline_kit.fake_hub import FakeHub, Faults
from slmops.config import (
    TINY_PHI3_REPO_ID,
    GenerationSpec,
    HubSpec,
    OnnxExportSpec,
    ServeFlowConfig,
    ServeSpec,
    Settings,
    WrapperKind,
)
from slmops.promotion import CHAMPION
from tasks.hub import HubConnection, fetch_model_snapshot, hf_cache_dir
from tasks.mlflow_models import CANDIDATE_TAG, FAILURE_TAG, FLOW_RUN_TAG, log_onnx_prompt_model
from tasks.registry import SOURCE_MODEL_TAG
from tasks.serving import ask
from tests.support.consistency import assert_consistent, servers_of_store
from tests.support.release_home import RELEASE_TIMEOUT_S, TOKEN, ReleaseHome, point_flows_at

pytestmark = pytest.mark.e2e

SPAIN = "What is the capital of Spain?"
SERVED = WrapperKind.PROMPT_ONNX
# Cheap but complete: no fp32 export for runtime parity; one served model (the ONNX prompt
# model starts in seconds, the transformers one in ~20 s); no front door.
SERVE = {"kinds": [SERVED.value], "front_door": False}
# Releases here run at once on a shared machine, so their latency is not the champion's: a
# generous slack keeps the gate about scores (its latency rule is unit-tested in test_gate).
BASE_CONFIG: dict[str, Any] = {
    "runtime_parity": False,
    "serve": SERVE,
    "gate": {"latency_slack_s": 10.0},
}
SERVE_SPEC = ServeSpec(kinds=(SERVED,), front_door=False)
# Printed by Prefect when the first wrapper is logged: the run is past fetching and building and
# has not validated, registered or promoted anything yet.
LOGGED_MARKER = re.compile(r"Task run 'log_chat_pipeline-\w+' - Finished in state Completed")


def config(**changes: Any) -> str:
    return json.dumps({**BASE_CONFIG, **changes})


@pytest.fixture()
def home(released: ReleaseHome) -> ReleaseHome:
    """The session's release home; its first release ran with HF_TOKEN set."""
    return released


def test_a_crashed_server_is_seen_by_status_and_repaired_by_the_serve_flow(
    home, monkeypatch, restores_serving
):
    point_flows_at(home, monkeypatch)
    before = home.status(SERVED)
    assert before.state == "serving"
    os.killpg(before.handle.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while home.status(SERVED).state != "dead" and time.monotonic() < deadline:
        time.sleep(0.1)

    rows = {r["name"]: r for r in serve(ServeFlowConfig(action="status", serve=SERVE_SPEC))}
    assert (rows[home.names[SERVED]]["state"], rows[home.names[SERVED]]["pid"]) == (
        "dead",
        before.handle.pid,
    )

    rows = {r["name"]: r for r in serve(ServeFlowConfig(action="start", serve=SERVE_SPEC))}
    after = home.status(SERVED)
    assert rows[home.names[SERVED]]["state"] == after.state == "serving"
    assert after.handle.pid != before.handle.pid
    champion = home.client.get_model_version_by_alias(home.names[SERVED], CHAMPION)
    assert after.handle.model_uri == f"models:/{home.names[SERVED]}/{champion.version}"
    assert "Madrid" in ask(after.handle, SPAIN)


def test_a_release_killed_mid_way_leaves_production_and_the_served_model_untouched(home):
    registry_before = home.registry()
    served_before = home.status(SERVED)
    answer_before = ask(served_before.handle, SPAIN)
    # A changed input, so the run really logs new models (nothing comes from Prefect's cache).
    proc = home.start("killed", config(generation={"max_new_tokens": 48}))
    log = home.outputs / "killed.log"
    try:
        deadline = time.monotonic() + RELEASE_TIMEOUT_S
        while not LOGGED_MARKER.search(log.read_text()):
            assert proc.poll() is None, f"the release ended before logging:\n{log.read_text()}"
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the run and anything it started in its group
        proc.wait(timeout=30)

    # It was killed mid-way: a new logged model exists, nothing of this run was registered.
    runs = home.client.search_runs(
        [e.experiment_id for e in home.client.search_experiments()],
        filter_string="params.`generation.max_new_tokens` = '48'",
    )
    assert runs, "the killed release logged nothing: the kill came too early to test anything"
    registered = {
        v.tags.get(SOURCE_MODEL_TAG)
        for name in home.names.values()
        for v in home.client.search_model_versions(f"name='{name}'")
    }
    for run in runs:
        for model in home.client.search_logged_models(
            experiment_ids=[run.info.experiment_id],
            filter_string=f"source_run_id = '{run.info.run_id}'",
        ):
            assert f"models:/{model.model_id}" not in registered
    # A run cut off while logging stays "pending", never "true": no one takes it as a candidate.
    cut_off = [r for r in runs if r.info.status == "RUNNING"]
    assert all(r.data.tags.get(CANDIDATE_TAG) == "pending" for r in cut_off), cut_off

    assert home.registry() == registry_before
    served_after = home.status(SERVED)
    assert served_after.state == "serving" and served_after.handle == served_before.handle
    assert ask(served_after.handle, SPAIN) == answer_before

    # The next `serve status` settles what the dead run left: its MLflow runs end KILLED and
    # non-candidate, its Prefect flow run ends Crashed; registry and server stay as they were.
    flow_run_ids = {r.data.tags[FLOW_RUN_TAG] for r in runs}
    assert len(flow_run_ids) == 1 and all(flow_run_ids), flow_run_ids
    with pytest.MonkeyPatch.context() as patch:
        point_flows_at(home, patch)
        serve(ServeFlowConfig(action="status", serve=SERVE_SPEC))
    for run in runs:
        settled = home.client.get_run(run.info.run_id)
        if run.info.status == "RUNNING":
            assert settled.info.status == "KILLED", settled.info
            assert settled.data.tags[CANDIDATE_TAG] == "false"
            assert "killed" in settled.data.tags[FAILURE_TAG]
    with get_client(sync_client=True) as prefect_client:
        flow_run = prefect_client.read_flow_run(UUID(flow_run_ids.pop()))
    assert flow_run.state is not None and flow_run.state.is_final(), flow_run.state
    assert flow_run.state.name == "Crashed"
    assert home.registry() == registry_before
    assert home.status(SERVED).handle == served_before.handle


# They promote new champions of every model but serve only the prompt model.
def test_two_releases_at_once_leave_the_registry_consistent(home, restores_serving):
    versions_before = {name: set(state.stages) for name, state in home.registry().items()}
    run_config = config(generation={"max_new_tokens": 40})
    procs = {label: home.start(label, run_config) for label in ("left", "right")}
    reports = {label: home.finish(label, proc) for label, proc in procs.items()}

    new_versions: dict[str, set[int]] = {name: set() for name in home.names.values()}
    for report in reports.values():
        for outcome in report["outcomes"]:
            assert outcome["validation_passed"] and outcome["promoted"], outcome
            name = outcome["registered_model"]
            new_versions[name].add(outcome["version"])
            version = home.client.get_model_version(name, str(outcome["version"]))
            assert version.tags[SOURCE_MODEL_TAG] == outcome["model_uri"]
    for name, state in home.registry().items():
        assert_consistent(home.store, name)
        assert set(state.stages) == versions_before[name] | new_versions[name]
        # The champion is one of this round's versions, whichever run promoted last.
        assert state.production_version() in new_versions[name], (state, new_versions)

    served = home.status(SERVED)
    assert served.state == "serving"
    version = int(served.handle.model_uri.rsplit("/", 1)[1])
    assert version in new_versions[home.names[SERVED]]
    # Both runs switched the server; the one that switched first had its server replaced.
    servers = servers_of_store(home.store, home.names[SERVED])
    assert [p.pid for p in servers] == [served.handle.pid]
    assert "Madrid" in ask(served.handle, SPAIN)


def _files_holding(secret: bytes, roots: list[Path]) -> list[Path]:
    found = []
    for root in roots:
        for path in [root] if root.is_file() else root.rglob("*"):
            if path.is_file() and not path.is_symlink() and secret in path.read_bytes():
                found.append(path)
    return found


def test_the_hf_token_appears_in_no_log_artifact_tag_or_record(
    home, fake_hub: FakeHub, tmp_path, monkeypatch, captured_logs
):
    # A fetch that needs the token: a gated repo on the fake hub, the token from HF_TOKEN.
    fake_hub.set_faults(Faults(gated_token=TOKEN), repo_id=TINY_PHI3_REPO_ID)
    point_flows_at(home, monkeypatch)
    monkeypatch.setenv("SLMOPS_HOME", str(tmp_path / "gated-home"))
    monkeypatch.setenv("HF_TOKEN", TOKEN)

    @flow(name="gated-fetch")
    def gated_fetch():
        settings = Settings.from_env()
        hub = HubConnection(
            endpoint=fake_hub.endpoint, token=settings.hf_token, cache_dir=hf_cache_dir(settings)
        )
        return fetch_model_snapshot(HubSpec(source="hub", repo_id=TINY_PHI3_REPO_ID), hub)

    snapshot = gated_fetch()
    assert snapshot.files and fake_hub.count("file") > 0
    assert all(r.authorized for r in fake_hub.requests if r.kind in ("head", "file"))

    secret = TOKEN.encode()
    control = tmp_path / "control.txt"
    control.write_text(f"token={TOKEN}")
    assert _files_holding(secret, [control]) == [control]  # the search can find it

    database = Path(str(PREFECT_SERVER_DATABASE_CONNECTION_URL.value()).split("///", 1)[1])
    roots = [
        home.settings.home,  # MLflow DB, artifacts, server logs, caches, locks
        home.outputs,  # every release's output
        home.machine_home,  # the first release's own temporary Prefect server: runs and logs
        tmp_path / "gated-home",
        Path(str(PREFECT_RESULTS_LOCAL_STORAGE_PATH.value())),
        *database.parent.glob(database.name + "*"),  # Prefect runs, states, logs, artifacts
    ]
    assert (home.outputs / "first.log").stat().st_size > 0 and (home.settings.servers_dir).is_dir()
    assert not _files_holding(secret, roots)
    assert captured_logs and not [line for line in captured_logs if TOKEN in line]

    # The same through MLflow's API: every param and tag of runs, logged models and versions.
    client = home.client
    experiments = [e.experiment_id for e in client.search_experiments()]
    texts = []
    for run in client.search_runs(experiments):
        texts += [json.dumps(run.data.params), json.dumps(run.data.tags)]
    for model in client.search_logged_models(experiment_ids=experiments):
        texts += [json.dumps(model.params), json.dumps(model.tags)]
    for name in home.names.values():
        texts += [json.dumps(v.tags) for v in client.search_model_versions(f"name='{name}'")]
    assert len(texts) > 10 and not [t for t in texts if TOKEN in t]

    # A served model never needs the hub: its process does not even hold the token.
    servers = servers_of_store(home.store)
    assert servers and not [p for p in servers if TOKEN in json.dumps(p.environ())]


def test_an_onnx_release_from_the_hub_cache_can_be_logged(
    fresh_store, tiny_onnx_int4_dir, tmp_path
):
    # The layout huggingface_hub leaves: snapshots/<commit>/<subfolder>/<file> -> blobs/<hash>.
    blobs = tmp_path / "blobs"
    folder = tmp_path / "snapshots" / "0123abcd" / tiny_onnx_int4_dir.name
    blobs.mkdir()
    folder.mkdir(parents=True)
    for path in tiny_onnx_int4_dir.iterdir():
        blob = blobs / path.name
        blob.write_bytes(path.read_bytes())
        (folder / path.name).symlink_to(os.path.relpath(blob, folder))
    ref = log_onnx_prompt_model.fn(
        fresh_store, "hub-onnx", folder, GenerationSpec(), OnnxExportSpec(source="hub"),
        {"repo": "slmops/tiny-phi3-onnx", "commit": "0123abcd"},
    )  # fmt: skip
    assert fresh_store.client().get_logged_model(ref.model_id)
