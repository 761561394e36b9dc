"""The scaled-out slmops, for real on this machine (`offline_kit.scale_out_stack`): PostgreSQL,
S3 (moto), a Prefect server and an MLflow server on them, two release hosts and a serving host,
each a worker with its own disk. Runs go through the Prefect API as the UI's Run button does.

Each commit is a copy of the embedded tiny Phi-3 with one file of its own, served by a fake hub
of its own; a run is pointed at it through its job variables (`HF_ENDPOINT`).

Excluded from the default run (`-m scale_out` runs it): 6 min 20 s on 2 cores.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from mlflow import MlflowClient

from offline_kit.fake_hub import FakeHub
from offline_kit.scale_out_stack import (
    BUCKET,
    RELEASE_POOL,
    ZOMBIE_AFTER_S,
    ScaleOutStack,
)
from slmops import tags
from slmops.config import TINY_PHI3_ONNX_REPO_ID, TINY_PHI3_REPO_ID, WrapperKind
from slmops.promotion import CHAMPION
from slmops.servers import read_handle
from slmops.store import ModelStore
from tasks.registry import audit_trail, read_state
from tasks.serving import ask
from tests.support.consistency import assert_consistent

pytestmark = pytest.mark.scale_out

PREFIX = "tiny-phi3"
NAMES = {kind: f"{PREFIX}-{kind.value}" for kind in WrapperKind}
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
RUN_TIMEOUT_S = 480


class Commits:
    """Commits of `slmops/tiny-phi3`, each on a fake hub of its own."""

    def __init__(self, model_dir: Path, folder: Path) -> None:
        self.model_dir, self.folder = model_dir, folder
        self.hubs: dict[str, FakeHub] = {}

    def new(self, label: str) -> str:
        """A new commit (a copy of the tiny model plus `variant.json`); its sha."""
        repo = self.folder / label
        shutil.copytree(self.model_dir, repo, ignore=shutil.ignore_patterns(".*"))
        (repo / "variant.json").write_text(json.dumps({"variant": label}))
        hub = FakeHub({TINY_PHI3_REPO_ID: repo}).start()
        sha = hub.commit_sha(TINY_PHI3_REPO_ID)
        self.hubs[sha] = hub
        return sha

    def close(self) -> None:
        for hub in self.hubs.values():
            hub.close()


class Api:
    """The Prefect API, as the UI uses it."""

    def __init__(self, stack: ScaleOutStack) -> None:
        self.client = httpx.Client(base_url=stack.prefect_api, timeout=30)

    def trigger(
        self,
        deployment: str,
        parameters: dict,
        queue: str | None = None,
        env: dict[str, str] | None = None,
    ) -> str:
        found = self.client.get(f"/deployments/name/{deployment}").json()
        body: dict = {"parameters": parameters}
        if queue is not None:
            body["work_queue_name"] = queue
        if env:
            body["job_variables"] = {"env": env}
        run = self.client.post(f"/deployments/{found['id']}/create_flow_run", json=body)
        run.raise_for_status()
        return str(run.json()["id"])

    def run(self, run_id: str) -> dict:
        return self.client.get(f"/flow_runs/{run_id}").json()

    def wait(self, run_id: str, timeout_s: float = RUN_TIMEOUT_S) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            run = self.run(run_id)
            if run["state"]["type"] in FINAL:
                return run
            time.sleep(1)
        raise TimeoutError(f"flow run {run_id} not final after {timeout_s} s: {run['state']}")

    def retried_task_runs(self, run_id: str) -> list[str]:
        runs = self.client.post(
            "/task_runs/filter", json={"task_runs": {"flow_run_id": {"any_": [run_id]}}}
        ).json()
        return [r["name"] for r in runs if r["run_count"] > 1]


def release_parameters(commit: str) -> dict:
    return {
        "config": {
            "hub": {
                "source": "hub",
                "repo_id": TINY_PHI3_REPO_ID,
                "revision": commit,
                "onnx_repo_id": TINY_PHI3_ONNX_REPO_ID,
            },
            "onnx": {"source": "build", "precision": "int4", "block_size": 32, "accuracy_level": 4},
            "registry": {"name_prefix": PREFIX},
            "serve": {"enabled": False},
            # Two releases share two cores: latency says nothing about the model here.
            "gate": {"latency_tolerance": 50.0, "latency_slack_s": 60.0},
            "promote": True,
            "runtime_parity": False,
        }
    }


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[ScaleOutStack]:
    started = time.monotonic()
    with ScaleOutStack(tmp_path_factory.mktemp("scale-out")) as running:
        print(f"stack up in {time.monotonic() - started:.0f} s: {running.timings}")
        yield running
        started_processes = [proc for _, proc in running.processes]
    # Torn down: every service and worker, and what the hosts' flow runs started (servers).
    assert all(proc.poll() is not None for proc in started_processes)
    assert not running.host_processes()


@pytest.fixture(scope="module")
def commits(tmp_path_factory, tiny_model_dir) -> Iterator[Commits]:
    made = Commits(tiny_model_dir, tmp_path_factory.mktemp("commits"))
    yield made
    made.close()


@pytest.fixture(scope="module")
def api(stack) -> Iterator[Api]:
    client = Api(stack)
    yield client
    client.client.close()


def release(api: Api, commits: Commits, commit: str, host: str) -> str:
    return api.trigger(
        "release/release",
        release_parameters(commit),
        queue=host,
        env={"HF_ENDPOINT": commits.hubs[commit].endpoint},
    )


def registry(stack: ScaleOutStack) -> MlflowClient:
    return ModelStore(tracking_uri=stack.tracking_uri).client()


def versions_of(stack: ScaleOutStack, name: str, commit: str) -> list[int]:
    return [
        int(v.version)
        for v in registry(stack).search_model_versions(f"name='{name}'")
        if (v.tags or {}).get(tags.SOURCE_COMMIT) == commit
    ]


def assert_audit_ordered(stack: ScaleOutStack, name: str) -> None:
    """Complete: the trail ends on the current champion. Ordered: the moves of one run are never
    interleaved with another's (each run moved the model under the cross-host lock)."""
    trail = audit_trail(ModelStore(tracking_uri=stack.tracking_uri), name)
    assert trail, name
    runs: list[str | None] = []
    for entry in trail:
        if not runs or runs[-1] != entry.flow_run:
            assert entry.flow_run not in runs, f"{name}: moves interleaved: {trail}"
            runs.append(entry.flow_run)
    champion = read_state(registry(stack), name).aliases[CHAMPION]
    last_champion = [e for e in trail if e.move.startswith(f"@{CHAMPION} ->")][-1]
    assert last_champion.version == champion, trail
    assert [e.at for e in trail] == sorted(e.at for e in trail)


def test_two_releases_and_a_rollback_at_once_on_two_hosts(stack, commits, api):
    c1, c2, c3, c4 = (commits.new(label) for label in ("c1", "c2", "c3", "c4"))
    started = time.monotonic()
    # Round 1: two releases of different commits at once, one per release host.
    first = [release(api, commits, c1, "host-a"), release(api, commits, c2, "host-b")]
    for run_id in first:
        assert api.wait(run_id)["state"]["type"] == "COMPLETED", api.run(run_id)["state"]
    chat_onnx = NAMES[WrapperKind.CHAT_ONNX]
    state = read_state(registry(stack), chat_onnx)
    standby = next(v for v, stage in state.stages.items() if stage != "Production")
    # Round 2: two more releases and a rollback (on the serving host) at once.
    second = [
        release(api, commits, c3, "host-a"),
        release(api, commits, c4, "host-b"),
        api.trigger(
            "rollback/rollback",
            {
                "config": {
                    "kind": WrapperKind.CHAT_ONNX.value,
                    "version": standby,
                    "reason": "scale-out test: roll back during two releases",
                    "registry": {"name_prefix": PREFIX},
                    "serve": {"kinds": [WrapperKind.CHAT_ONNX.value], "front_door": False},
                }
            },
        ),
    ]
    hosts = set()
    for run_id in second:
        run = api.wait(run_id)
        assert run["state"]["type"] == "COMPLETED", run["state"]
        hosts.add(run["work_queue_name"])
    print(f"two rounds in {time.monotonic() - started:.0f} s")
    assert {"host-a", "host-b"} <= hosts

    for kind, name in NAMES.items():
        assert_consistent(ModelStore(tracking_uri=stack.tracking_uri), name)
        assert_audit_ordered(stack, name)
        # Each commit registered once per model: four versions, no duplicates.
        for commit in (c1, c2, c3, c4):
            assert len(versions_of(stack, name, commit)) == 1, (kind, commit)

    # The serving host serves the champion, loaded from the artifact store (it has no copy).
    serve = api.trigger(
        "serve/serve-champions",
        {
            "config": {
                "action": "start",
                "registry": {"name_prefix": PREFIX},
                "serve": {"kinds": [WrapperKind.CHAT_ONNX.value], "front_door": False},
            }
        },
    )
    assert api.wait(serve)["state"]["type"] == "COMPLETED"
    serving_home = stack.hosts["serving-host"].slmops_home
    handle = read_handle(serving_home / "servers", chat_onnx)
    champion = read_state(registry(stack), chat_onnx).aliases[CHAMPION]
    assert handle is not None and handle.model_uri == f"models:/{chat_onnx}/{champion}"
    assert ask(handle, "What is the capital of Spain?").strip()
    assert not (serving_home / "cache").exists(), "the serving host fetched or built a model"
    # The models and the shared ONNX folder are in the S3 bucket, behind the tracking server.
    keys = s3_keys(stack)
    assert sum(key.endswith("/MLmodel") for key in keys) >= 4 * len(NAMES), len(keys)
    assert any(key.endswith("/onnx_model/genai_config.json") for key in keys)


def s3_keys(stack: ScaleOutStack) -> list[str]:
    pages = (
        stack.s3_client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="mlflow/")
    )
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def test_a_host_killed_mid_release_leaves_production_to_the_other(stack, commits, api):
    c5, c6 = commits.new("c5"), commits.new("c6")
    before = {name: read_state(registry(stack), name) for name in NAMES.values()}
    doomed = release(api, commits, c5, "host-a")
    survivor = release(api, commits, c6, "host-b")

    def logging_started() -> bool:
        # A wrapper's run is open (a candidate, `pending`): the kill leaves it to be settled.
        runs = registry(stack).search_runs(
            [e.experiment_id for e in registry(stack).search_experiments()],
            filter_string=(
                f"tags.`{tags.SOURCE_COMMIT}` = '{c5}' and tags.`{tags.CANDIDATE}` = 'pending'"
            ),
        )
        return bool(runs)

    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not logging_started():
        assert time.monotonic() < deadline, "the doomed release never started logging"
        assert api.run(doomed)["state"]["type"] not in FINAL, api.run(doomed)["state"]
        time.sleep(0.5)
    killed = stack.kill_host("host-a")
    assert killed

    run = api.wait(survivor)
    assert run["state"]["type"] == "COMPLETED", run["state"]
    assert api.run(doomed)["state"]["type"] not in {"COMPLETED"}
    dead_run_name = api.run(doomed)["name"]
    for name, old in before.items():
        assert_consistent(ModelStore(tracking_uri=stack.tracking_uri), name)
        assert_audit_ordered(stack, name)
        state = read_state(registry(stack), name)
        for version in versions_of(stack, name, c5):
            assert state.stages[version] == "None", (name, version, state)
        assert state.aliases[CHAMPION] in versions_of(stack, name, c6), (name, old, state)
        assert all(
            e.flow_run != dead_run_name
            for e in audit_trail(ModelStore(tracking_uri=stack.tracking_uri), name)
        )
    # What the dead host left: Prefect's heartbeat automation crashes its flow run, and the
    # next slmops run on any host (here the serving host's `serve status`) ends its MLflow
    # runs KILLED and non-candidate. Its lease died with the host.
    deadline = time.monotonic() + ZOMBIE_AFTER_S + 90
    while api.run(doomed)["state"]["type"] != "CRASHED":
        assert time.monotonic() < deadline, api.run(doomed)["state"]
        time.sleep(2)
    assert "no heartbeat" in api.run(doomed)["state"]["message"]
    status = api.trigger(
        "serve/serve-champions",
        {"config": {"action": "status", "registry": {"name_prefix": PREFIX}}},
    )
    assert api.wait(status)["state"]["type"] == "COMPLETED"
    client = registry(stack)
    dead_runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string=f"tags.`{tags.FLOW_RUN}` = '{doomed}'",
    )
    assert dead_runs
    for dead in dead_runs:
        assert dead.info.status in {"KILLED", "FAILED", "FINISHED"}, dead.info
        assert dead.data.tags[tags.CANDIDATE] != "pending", dead.data.tags
    assert any(d.info.status == "KILLED" for d in dead_runs)
    stack.start_worker("host-a", RELEASE_POOL)  # the host comes back for the next test


def test_s3_down_during_logging_fails_clearly_and_promotes_nothing(stack, commits, api):
    assert stack.relay is not None
    c7 = commits.new("c7")
    before = {name: read_state(registry(stack), name) for name in NAMES.values()}
    # Fewer and shorter client retries than the defaults (7, backoff 2: minutes).
    run_id = api.trigger(
        "release/release",
        release_parameters(c7),
        queue="host-b",
        env={
            "HF_ENDPOINT": commits.hubs[c7].endpoint,
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
            "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
        },
    )
    deadline = time.monotonic() + RUN_TIMEOUT_S
    experiments = None
    while True:
        assert time.monotonic() < deadline, "the release never started logging"
        assert api.run(run_id)["state"]["type"] not in FINAL, api.run(run_id)["state"]
        with contextlib.suppress(Exception):
            experiments = experiments or [
                e.experiment_id for e in registry(stack).search_experiments()
            ]
            if registry(stack).search_runs(
                experiments, filter_string=f"tags.`{tags.SOURCE_COMMIT}` = '{c7}'"
            ):
                break
        time.sleep(0.2)
    stack.relay.cut()
    try:
        run = api.wait(run_id, timeout_s=300)
    finally:
        stack.relay.restore()
    assert run["state"]["type"] == "FAILED", run["state"]
    message = run["state"]["message"] or ""
    print(f"failure: {message}")
    assert "the artifact store behind" in message and "--artifacts-destination" in message, message
    assert api.retried_task_runs(run_id), "no task was retried"
    for name, old in before.items():
        state = read_state(registry(stack), name)
        assert state.aliases[CHAMPION] == old.aliases[CHAMPION], name
        assert [v for v, s in state.stages.items() if s == "Production"] == [
            v for v, s in old.stages.items() if s == "Production"
        ]
    # The store works again once S3 is back.
    client = registry(stack)
    check = client.create_run(client.search_experiments()[0].experiment_id)
    client.log_text(check.info.run_id, "ok", "check.txt")
