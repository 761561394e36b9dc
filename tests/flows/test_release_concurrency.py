"""Registry and serving tasks run by several processes at once, as concurrent release runs do.

Each worker is a separate Python process (two release runs are two processes sharing one SQLite
store, one lock folder and one servers folder). Workers import and prepare first, then wait
for a common start signal, so the racing calls really overlap.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prefect.logging import disable_run_logger

from slmops.config import ModelServerSpec, WrapperKind
from slmops.promotion import CHAMPION
from slmops.store import ModelStore
from tasks.registry import promote_version, read_state
from tasks.serving import ask, healthy, serve_model, status_of, stop_server
from tests.support.consistency import assert_consistent, servers_of_store
from tests.support.echo_versions import log_echo_model, register

REPO_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 120.0
WORKERS = 3  # enough to race; each worker costs ~3 s of imports on a 2-core machine
SHARED_MODELS = 3
ROUNDS = 2

# Registers, as versions of "m", the logged models SHARED_MODEL_URIS names, or else `rounds`
# echo models of its own, one per round, and promotes each if asked. All workers start each
# registration and each promotion together. Prints the versions it registered as JSON.
REGISTER_AND_PROMOTE = """
import json, os, sys, time
from pathlib import Path
from prefect.logging import disable_run_logger
from slmops.store import ModelStore
from tasks.registry import promote_version, register_version
from tests.support.echo_versions import log_echo_model

store, work, index = ModelStore(tracking_uri=sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
workers, rounds, promote = int(sys.argv[4]), int(sys.argv[5]), sys.argv[6] == "1"
shared = os.environ.get("SHARED_MODEL_URIS")
model_uris = shared.split(",") if shared else [log_echo_model(store) for _ in range(rounds)]


def together(step):
    (work / f"{step}-{index}").touch()
    deadline = time.monotonic() + 60
    while len(list(work.glob(f"{step}-*"))) < workers:
        if time.monotonic() > deadline:
            sys.exit(f"worker {index}: the others never reached {step}")
        time.sleep(0.001)


(work / f"ready-{index}").touch()
while not (work / "go").exists():
    time.sleep(0.001)
versions = []
with disable_run_logger():
    for step, model_uri in enumerate(model_uris):
        together(f"register{step}")
        ref = register_version.fn(store, model_uri, "m", {"slmops.validation.passed": "true"})
        versions.append(ref.version)
        if promote:
            together(f"promote{step}")
            promote_version.fn(store, ref, f"worker {index}", work / "locks")
print(json.dumps({"versions": versions}))
"""

SERVE = """
import json, sys, time
from pathlib import Path
from prefect.logging import disable_run_logger
from slmops.config import ModelServerSpec, WrapperKind
from slmops.store import ModelStore
from tasks.serving import serve_model

store, work, index = ModelStore(tracking_uri=sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
model_uri = sys.argv[4]
(work / f"ready-{index}").touch()
while not (work / "go").exists():
    time.sleep(0.01)
with disable_run_logger():
    spec = ModelServerSpec(model_uri=model_uri, name="echo", kind=WrapperKind.PROMPT_ONNX,
                           smoke_question="hello", startup_timeout_s=120.0)
    result = serve_model.fn(spec, work / "servers", store)
print(json.dumps({"port": result.handle.port, "model_uri": result.handle.model_uri}))
"""


def worker_args(store: ModelStore, tmp_path: Path, index: int, rounds: int, promote: bool):
    return [store.tracking_uri, str(tmp_path / "work"), str(index), str(WORKERS), str(rounds)] + [
        "1" if promote else "0"
    ]


def run_at_once(
    script: str, work: Path, argv: list[list[str]], env: dict[str, str] | None = None
) -> list[dict]:
    """Start one worker per argv, release them together, return each one's JSON output."""
    work.mkdir(parents=True, exist_ok=True)
    logs = [(work / f"worker-{i}.out", work / f"worker-{i}.err") for i in range(len(argv))]
    procs = []
    for args, (out, err) in zip(argv, logs, strict=True):
        with open(out, "w") as stdout, open(err, "w") as stderr:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", script, *args],
                    cwd=REPO_ROOT,
                    env={**os.environ, **(env or {})},
                    stdout=stdout,
                    stderr=stderr,
                )
            )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while len(list(work.glob("ready-*"))) < len(procs):
            if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        else:
            (work / "go").touch()
        for proc in procs:
            proc.wait(timeout=max(0.1, deadline + START_TIMEOUT_S - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    # A worker that failed on its own first: the others may only have waited for it.
    failures = sorted(
        ((p.returncode, err) for p, (_, err) in zip(procs, logs, strict=True) if p.returncode),
        key=lambda failure: failure[0] < 0,
    )
    assert not failures, "\n".join(
        f"worker exit {code}: {err.read_text()[-6000:]}" for code, err in failures[:1]
    )
    return [json.loads(out.read_text().strip().splitlines()[-1]) for out, _ in logs]


@pytest.mark.integration
def test_logged_models_registered_by_runs_at_once_are_one_version_each(fresh_store, tmp_path):
    # Runs that share cached logged models register the same URIs at about the same time.
    # Several models, registered in the same order by each worker: several chances to collide
    # between the look-up for an existing version and the creation of a new one.
    shared = [log_echo_model(fresh_store) for _ in range(SHARED_MODELS)]
    results = run_at_once(
        REGISTER_AND_PROMOTE,
        tmp_path / "work",
        [worker_args(fresh_store, tmp_path, i, rounds=0, promote=False) for i in range(WORKERS)],
        env={"SHARED_MODEL_URIS": ",".join(shared)},
    )
    expected = list(range(1, SHARED_MODELS + 1))
    assert [r["versions"] for r in results] == [expected] * WORKERS
    versions = fresh_store.client().search_model_versions("name='m'")
    assert sorted(int(v.version) for v in versions) == expected


@pytest.mark.integration
def test_runs_registering_and_promoting_at_once_leave_a_consistent_registry(fresh_store, tmp_path):
    # A champion to replace, as in a real release.
    with disable_run_logger():
        promote_version.fn(
            fresh_store, register(fresh_store, "m"), "first", tmp_path / "work" / "locks"
        )
    results = run_at_once(
        REGISTER_AND_PROMOTE,
        tmp_path / "work",
        [
            worker_args(fresh_store, tmp_path, i, rounds=ROUNDS, promote=True)
            for i in range(WORKERS)
        ],
    )
    registered = sorted(v for r in results for v in r["versions"])
    assert registered == list(range(2, WORKERS * ROUNDS + 2))
    assert_consistent(fresh_store, "m")
    state = read_state(fresh_store.client(), "m")
    assert sorted(state.stages.values()) == ["Archived"] * WORKERS * ROUNDS + ["Production"]
    # The last promotion to finish is the champion: some worker's last version.
    assert state.production_version() in {r["versions"][-1] for r in results}


@pytest.mark.e2e
def test_runs_serving_one_model_at_once_leave_one_server(fresh_store, tmp_path):
    versions = [register(fresh_store, "echo") for _ in range(2)]
    servers_dir = tmp_path / "work" / "servers"
    try:
        results = run_at_once(
            SERVE,
            tmp_path / "work",
            [
                [fresh_store.tracking_uri, str(tmp_path / "work"), str(i), v.uri]
                for i, v in enumerate(versions)
            ],
        )
        status = status_of(servers_dir, "echo")
        assert status.state == "serving"
        assert status.handle.model_uri in {r["model_uri"] for r in results}
        # The run that served first had its server replaced by the second: none is orphaned.
        live = [r["port"] for r in results if healthy(f"http://127.0.0.1:{r['port']}")]
        assert live == [status.handle.port], f"servers still answering: {live}"
        assert [p.pid for p in servers_of_store(fresh_store)] == [status.handle.pid]
        assert "hello" in ask(status.handle, "hello")
    finally:
        stop_server(servers_dir, "echo")
        for orphan in servers_of_store(fresh_store):
            os.killpg(orphan.pid, signal.SIGKILL)


@pytest.mark.e2e
def test_serving_an_alias_serves_the_version_it_points_to_then(fresh_store, tmp_path):
    servers_dir = tmp_path / "servers"
    v1 = register(fresh_store, "echo")
    v2 = register(fresh_store, "echo")
    client = fresh_store.client()
    client.set_registered_model_alias("echo", CHAMPION, "2")
    try:
        with disable_run_logger():
            spec = ModelServerSpec(
                model_uri="models:/echo@champion", name="echo", kind=WrapperKind.PROMPT_ONNX,
                smoke_question="hello", startup_timeout_s=120.0,
            )  # fmt: skip
            first = serve_model.fn(spec, servers_dir, fresh_store)
            assert first.handle.model_uri == v2.uri
            client.set_registered_model_alias("echo", CHAMPION, "1")
            second = serve_model.fn(spec, servers_dir, fresh_store)
        assert second.handle.model_uri == v1.uri and second.replaced == first.handle
        assert status_of(servers_dir, "echo").state == "serving"
    finally:
        stop_server(servers_dir, "echo")
