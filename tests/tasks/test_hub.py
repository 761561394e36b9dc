"""Fetching through the real huggingface_hub client from the fake hub: cache, retries, checks."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar
from uuid import UUID

import httpx2
import pytest
from huggingface_hub import snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
)
from huggingface_hub.utils import filter_repo_objects
from prefect import Task, flow
from prefect.context import FlowRunContext
from prefect.tasks import exponential_backoff
from pydantic import SecretStr

from offline_kit.fake_hub import ALWAYS, FakeHub, Faults
from slmops.config import (
    PHI3_ONNX_INT4_SUBFOLDER,
    TINY_PHI3_ONNX_REPO_ID,
    TINY_PHI3_REPO_ID,
    HubSpec,
    Settings,
)
from tasks.hub import (
    HubAccessError,
    HubConnection,
    HubUnreachableError,
    SnapshotCachePolicy,
    SnapshotVerificationError,
    fetch_model_snapshot,
    fetch_onnx_release,
    fetch_repo,
    fetch_snapshot,
    hf_cache_dir,
    resolve_revision,
    snapshot_dir,
)
from tasks.retrying import is_transient

T = TypeVar("T")

MODEL = TINY_PHI3_REPO_ID
WEIGHTS = "model-00001-of-00002.safetensors"  # an LFS file (sha256-checked), ~1 MB
MODEL_PATTERNS = HubSpec().allow_patterns
TOKEN = "hf_slmops_test_token_do_not_leak_42"
FAST_BACKOFF_S = 0.01


def in_flow(fn: Callable[[], T], run_ids: list[UUID] | None = None) -> T:
    """Run `fn` inside a new flow run (tasks need one to be cached and retried)."""

    @flow(name="hub-test")
    def hub_test() -> T:
        if run_ids is not None:
            run_ids.append(FlowRunContext.get().flow_run.id)
        return fn()

    return hub_test()


def fast(task: Task, retries: int) -> Task:
    return task.with_options(
        retries=retries, retry_delay_seconds=exponential_backoff(FAST_BACKOFF_S)
    )


def fetch_direct(
    hub: FakeHub,
    cache_dir: Path,
    *,
    retries: int,
    timeout_s: float = 10.0,
    patterns: tuple[str, ...] = MODEL_PATTERNS,
):
    """The fetch_snapshot task alone, at the model's known commit."""
    commit = hub.commit_sha(MODEL)
    task = fast(fetch_snapshot, retries)
    return in_flow(
        lambda: task(MODEL, commit, patterns, cache_dir, hub.endpoint, timeout_s=timeout_s)
    )


def fetch_main(hub: FakeHub, cache_dir: Path, *, retries: int = 3, token: SecretStr | None = None):
    """Resolve main, then fetch (the plain function the flows call)."""
    return fetch_repo(
        MODEL,
        "main",
        MODEL_PATTERNS,
        cache_dir,
        endpoint=hub.endpoint,
        token=token,
        retries=retries,
        retry_backoff_s=FAST_BACKOFF_S,
    )


def _response(status: int) -> httpx2.Response:
    return httpx2.Response(status, request=httpx2.Request("GET", "http://hub/api/models/a/b"))


def expected_files(folder: Path, patterns: tuple[str, ...]) -> tuple[str, ...]:
    names = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    return tuple(sorted(filter_repo_objects(names, allow_patterns=list(patterns))))


def assert_same_files(fetched: Path, source: Path, files: tuple[str, ...]) -> None:
    for name in files:
        assert (fetched / name).read_bytes() == (source / name).read_bytes(), name


@pytest.mark.unit
@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (HfHubHTTPError("x", response=_response(503)), True),
        (HfHubHTTPError("x", response=_response(500)), True),
        (HfHubHTTPError("x", response=_response(429)), True),
        (HfHubHTTPError("x", response=_response(404)), False),
        (HfHubHTTPError("x", response=_response(401)), False),
        (GatedRepoError("x", response=_response(401)), False),
        (RepositoryNotFoundError("x", response=_response(404)), False),
        (httpx2.ReadTimeout("x"), True),
        (httpx2.RemoteProtocolError("x"), True),
        (OSError("Consistency check failed: file should be of size 3 but has size 1"), True),
        (SnapshotVerificationError("x", ["a"]), True),
        (HubAccessError("x"), False),
        (LocalEntryNotFoundError("no cache"), False),
        (ValueError("x"), False),
    ],
)
def test_is_transient(error: BaseException, transient: bool) -> None:
    assert is_transient(error) is transient


@pytest.mark.unit
def test_is_transient_follows_the_cause() -> None:
    try:
        try:
            raise HfHubHTTPError("down", response=_response(503))
        except HfHubHTTPError as outage:
            raise LocalEntryNotFoundError("cannot find the files") from outage
    except LocalEntryNotFoundError as error:
        assert is_transient(error)


@pytest.mark.integration
def test_cache_key_ignores_token_and_endpoint_and_needs_a_complete_snapshot(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    commit = fake_hub.commit_sha(MODEL)
    inputs: dict[str, Any] = dict(
        repo_id=MODEL,
        commit=commit,
        allow_patterns=MODEL_PATTERNS,
        cache_dir=tmp_path,
        endpoint=fake_hub.endpoint,
        token=SecretStr(TOKEN),
        revision="main",
        timeout_s=10.0,
    )
    ctx = SimpleNamespace(task=fetch_snapshot)

    def key(policy: SnapshotCachePolicy | None = None, **changes: Any) -> str | None:
        return (policy or SnapshotCachePolicy()).compute_key(ctx, {**inputs, **changes}, {})

    assert key() is None  # nothing on disk yet: never serve a cached result
    assert key(SnapshotCachePolicy(require_complete=False)) is not None
    snapshot_download(
        MODEL,
        revision=commit,
        allow_patterns=list(MODEL_PATTERNS),
        cache_dir=tmp_path,
        endpoint=fake_hub.endpoint,
        token=False,
    )
    base = key()
    assert base is not None
    assert key(SnapshotCachePolicy(require_complete=False)) == base
    assert key(token=None, endpoint="http://127.0.0.1:1", timeout_s=1.0) == base
    assert key(allow_patterns=("*.json",)) not in (None, base)
    assert key(revision=commit) != base

    (snapshot_dir(tmp_path, MODEL, commit) / WEIGHTS).unlink()
    assert key() is None


@pytest.mark.integration
def test_fetches_the_embedded_model_and_the_onnx_subfolder(
    prefect_harness: None, fake_hub: FakeHub, embedded_repos: dict[str, Path], tmp_path: Path
) -> None:
    settings = Settings(slmops_home=tmp_path)
    hub = HubConnection(endpoint=fake_hub.endpoint, cache_dir=hf_cache_dir(settings))
    spec = HubSpec()

    model, onnx_dir = in_flow(
        lambda: (
            fetch_model_snapshot(spec, hub),
            fetch_onnx_release(spec, hub),
        )
    )

    source = embedded_repos[MODEL]
    assert model.repo_id == MODEL and model.revision == "main"
    assert model.commit == fake_hub.commit_sha(MODEL)
    assert model.files == expected_files(source, MODEL_PATTERNS)
    assert WEIGHTS in model.files and "README.md" not in model.files
    assert model.path.is_relative_to(settings.cache_dir)
    assert_same_files(model.path, source, model.files)

    onnx_source = embedded_repos[TINY_PHI3_ONNX_REPO_ID]
    onnx_files = expected_files(onnx_source, (f"{PHI3_ONNX_INT4_SUBFOLDER}/*",))
    assert (
        onnx_dir
        == snapshot_dir(
            settings.cache_dir / "huggingface",
            TINY_PHI3_ONNX_REPO_ID,
            fake_hub.commit_sha(TINY_PHI3_ONNX_REPO_ID),
        )
        / PHI3_ONNX_INT4_SUBFOLDER
    )
    assert (onnx_dir / "genai_config.json").is_file()
    assert_same_files(onnx_dir.parents[1], onnx_source, onnx_files)
    assert not (onnx_dir.parents[1] / "README.md").exists()  # outside the subfolder pattern
    assert fake_hub.count("file", repo_id=TINY_PHI3_ONNX_REPO_ID) == len(onnx_files)
    assert fake_hub.count("unknown") == 0


@pytest.mark.integration
def test_resolve_revision_main_is_the_fixed_commit(fake_hub: FakeHub) -> None:
    commit = fake_hub.commit_sha(MODEL)
    assert resolve_revision.fn(MODEL, "main", fake_hub.endpoint) == commit
    fake_hub.reset_counts()
    assert resolve_revision.fn(MODEL, commit, fake_hub.endpoint) == commit
    assert fake_hub.count() == 0  # a commit needs no lookup


@pytest.mark.integration
def test_second_run_downloads_nothing(
    prefect_harness: None, fake_hub: FakeHub, tmp_path: Path
) -> None:
    first = in_flow(lambda: fetch_main(fake_hub, tmp_path))
    assert fake_hub.count("file") == len(first.files) > 0

    fake_hub.reset_counts()
    second = in_flow(lambda: fetch_main(fake_hub, tmp_path))
    assert second == first
    assert fake_hub.count("file") == 0
    assert fake_hub.count("head") == fake_hub.count("tree") == 0
    # Only resolve_revision asked the hub (branches move); fetch_snapshot came from Prefect's
    # cache: its own files-metadata request did not happen.
    assert fake_hub.count("info") == 1


@pytest.mark.integration
def test_vanished_snapshot_is_fetched_again(
    prefect_harness: None, fake_hub: FakeHub, tmp_path: Path
) -> None:
    first = in_flow(lambda: fetch_main(fake_hub, tmp_path))
    shutil.rmtree(tmp_path)

    fake_hub.reset_counts()
    again = in_flow(lambda: fetch_main(fake_hub, tmp_path))
    assert again == first and again.path.is_dir()
    assert fake_hub.count("file") == len(first.files)

    fake_hub.reset_counts()
    assert in_flow(lambda: fetch_main(fake_hub, tmp_path)) == first
    assert fake_hub.count("info") == 1  # the refreshed result is cached again

    # The task on its own (no refresh by the caller) does not serve the stale result either.
    direct = fetch_direct(fake_hub, tmp_path / "direct", retries=0)
    shutil.rmtree(direct.path)
    fake_hub.reset_counts()
    assert fetch_direct(fake_hub, tmp_path / "direct", retries=0).path.is_dir()
    assert fake_hub.count("head") == len(direct.files)  # blobs were still cached: relinked


@pytest.mark.integration
def test_unavailable_hub_on_resolve_is_retried(prefect_harness: None, fake_hub: FakeHub) -> None:
    resolve = (MODEL, "main", fake_hub.endpoint)
    fake_hub.set_faults(Faults(unavailable=ALWAYS, unavailable_kinds=frozenset({"info"})))
    with pytest.raises(HfHubHTTPError, match="503"):
        in_flow(lambda: fast(resolve_revision, 0)(*resolve))
    assert fake_hub.count("info") == 1

    fake_hub.reset_counts()
    fake_hub.set_faults(Faults(unavailable=2, unavailable_kinds=frozenset({"info"})))
    assert in_flow(lambda: fast(resolve_revision, 2)(*resolve)) == fake_hub.commit_sha(MODEL)
    assert fake_hub.count("info") == 3


TRANSIENT_FAULTS: dict[str, Callable[[int], Faults]] = {
    "503 on file downloads": lambda n: Faults(unavailable=n, unavailable_kinds=frozenset({"file"})),
    "connection cut mid-file": lambda n: Faults(cut={WEIGHTS: n}),
    "hang past the timeout": lambda n: Faults(hang={WEIGHTS: n}, hang_s=5.0),
}


@pytest.fixture()
def resume_pauses(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """huggingface_hub sleeps 1 s before each of its own resume attempts of a download
    (`file_download.http_get`); the attempts still happen, the pauses are only recorded."""
    import huggingface_hub.file_download as file_download

    pauses: list[float] = []
    monkeypatch.setattr(file_download, "time", SimpleNamespace(sleep=pauses.append))
    return pauses


@pytest.mark.integration
@pytest.mark.parametrize("fault", TRANSIENT_FAULTS)
def test_transient_fault_fails_without_retries_and_is_survived_with_them(
    prefect_harness: None,
    resume_pauses: list[float],
    fake_hub: FakeHub,
    embedded_repos: dict[str, Path],
    tmp_path: Path,
    fault: str,
) -> None:
    make_faults = TRANSIENT_FAULTS[fault]
    timeout_s = 0.5 if fault.startswith("hang") else 10.0

    def faulty_requests() -> int:
        return sum(1 for r in fake_hub.requests if r.kind == "file" and r.fault is not None)

    # One file, so that the count of faulty requests per attempt is deterministic (with
    # several, huggingface_hub cancels the downloads not yet started once one fails).
    options: dict[str, Any] = dict(timeout_s=timeout_s, patterns=(WEIGHTS,))

    # Persistent fault, no task retries: one task attempt fails (huggingface_hub's own resume
    # retries included); count the requests that attempt made.
    fake_hub.set_faults(make_faults(ALWAYS))
    with pytest.raises(Exception) as failure:
        fetch_direct(fake_hub, tmp_path / "no-retries", retries=0, **options)
    assert is_transient(failure.value), repr(failure.value)
    attempt_requests = faulty_requests()
    assert attempt_requests >= 1
    if attempt_requests > 1:  # huggingface_hub resumed (and would have paused) in between
        assert len(resume_pauses) >= attempt_requests - 1

    # The same fault for exactly one attempt's worth of requests: the task's retry gets through.
    fake_hub.reset_counts()
    fake_hub.set_faults(make_faults(attempt_requests))
    ref = fetch_direct(fake_hub, tmp_path / "retries", retries=1, **options)
    assert ref.files == (WEIGHTS,)
    assert_same_files(ref.path, embedded_repos[MODEL], ref.files)
    assert faulty_requests() == attempt_requests
    clean = [r for r in fake_hub.requests if r.kind == "file" and r.path == WEIGHTS and not r.fault]
    assert len(clean) == 1  # the retry downloaded it once, whole


@pytest.mark.integration
@pytest.mark.parametrize("target", [WEIGHTS, "config.json"], ids=["lfs-sha256", "git-blob-sha1"])
def test_corrupted_file_is_caught_evicted_and_refetched(
    prefect_harness: None,
    fake_hub: FakeHub,
    embedded_repos: dict[str, Path],
    tmp_path: Path,
    target: str,
) -> None:
    fake_hub.set_faults(Faults(corrupt={target: ALWAYS}))
    with pytest.raises(SnapshotVerificationError, match=target) as failure:
        fetch_direct(fake_hub, tmp_path / "a", retries=0)
    assert failure.value.files == (target,)
    assert is_transient(failure.value)
    folder = snapshot_dir(tmp_path / "a", MODEL, fake_hub.commit_sha(MODEL))
    assert not (folder / target).exists()  # evicted: a retry downloads it again
    assert (folder / "config.json").exists() or target == "config.json"
    blobs = list(folder.parents[1].joinpath("blobs").iterdir())
    assert len(blobs) == len(expected_files(embedded_repos[MODEL], MODEL_PATTERNS)) - 1

    fake_hub.reset_counts()
    fake_hub.set_faults(Faults(corrupt={target: 1}))
    ref = fetch_direct(fake_hub, tmp_path / "b", retries=1)
    assert_same_files(ref.path, embedded_repos[MODEL], ref.files)
    assert fake_hub.count("file", path=target) == 2


@pytest.mark.integration
def test_gated_repo_without_token_fails_fast(
    prefect_harness: None, fake_hub: FakeHub, tmp_path: Path
) -> None:
    fake_hub.set_faults(Faults(gated_token=TOKEN), repo_id=MODEL)
    with pytest.raises(HubAccessError) as failure:
        in_flow(lambda: fetch_main(fake_hub, tmp_path, retries=3))
    message = str(failure.value)
    assert MODEL in message and "gated" in message and "HF_TOKEN" in message
    assert isinstance(failure.value.__cause__, GatedRepoError)
    # One attempt only, despite retries=3: each fetch attempt asks for the files' metadata
    # once, after resolve_revision's request. Refused at the first HEADs, no content fetched.
    assert fake_hub.count("info") == 2
    assert fake_hub.count("head", status=401) >= 1
    assert fake_hub.count("file") == 0


@pytest.mark.integration
def test_unknown_repo_fails_fast_with_a_clear_message(
    prefect_harness: None, fake_hub: FakeHub, tmp_path: Path
) -> None:
    with pytest.raises(HubAccessError, match="Repository microsoft/no-such-model was not found"):
        in_flow(
            lambda: fetch_repo(
                "microsoft/no-such-model",
                "main",
                MODEL_PATTERNS,
                tmp_path,
                endpoint=fake_hub.endpoint,
                retries=3,
                retry_backoff_s=FAST_BACKOFF_S,
            )
        )
    assert fake_hub.count("info", repo_id="microsoft/no-such-model") == 1


@pytest.mark.integration
def test_gated_repo_with_token_works_and_the_token_stays_secret(
    prefect_harness: None,
    fake_hub: FakeHub,
    embedded_repos: dict[str, Path],
    tmp_path: Path,
    captured_logs: list[str],
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.settings import (
        PREFECT_RESULTS_LOCAL_STORAGE_PATH,
        PREFECT_SERVER_DATABASE_CONNECTION_URL,
    )

    wrong = "hf_wrong_token_also_secret_77"
    fake_hub.set_faults(Faults(gated_token=TOKEN), repo_id=MODEL)
    run_ids: list[UUID] = []
    with pytest.raises(HubAccessError, match="the token given has no access"):
        in_flow(lambda: fetch_main(fake_hub, tmp_path, token=SecretStr(wrong)), run_ids)
    assert fake_hub.count("info") == 2  # resolve + one fetch attempt: no retry

    ref = in_flow(lambda: fetch_main(fake_hub, tmp_path, token=SecretStr(TOKEN)), run_ids)
    assert_same_files(ref.path, embedded_repos[MODEL], ref.files)
    assert all(r.authorized for r in fake_hub.requests if r.kind in ("head", "file"))

    # Wait until the server has recorded all four task runs, then look everywhere cheap.
    with get_client(sync_client=True) as client:
        deadline = time.monotonic() + 30
        while True:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=run_ids))
            )
            if len(runs) >= 4 and all(r.state is not None and r.state.is_final() for r in runs):
                break
            assert time.monotonic() < deadline, [(r.name, r.state) for r in runs]
            time.sleep(0.2)
        records = [r.model_dump_json() for r in runs]
        records += [client.read_flow_run(run_id).model_dump_json() for run_id in run_ids]

    database = Path(PREFECT_SERVER_DATABASE_CONNECTION_URL.value().split("///", 1)[1])
    stored = [p.read_bytes() for p in database.parent.glob(database.name + "*")]
    results = Path(PREFECT_RESULTS_LOCAL_STORAGE_PATH.value())
    stored += [p.read_bytes() for p in results.rglob("*") if p.is_file()]
    assert stored and captured_logs
    for secret in (TOKEN, wrong):
        assert secret not in repr(ref) and secret not in ref.model_dump_json()
        assert not [r for r in records if secret in r]
        assert not [line for line in captured_logs if secret in line]
        assert not [blob for blob in stored if secret.encode() in blob]


@pytest.mark.parametrize(
    "endpoint", ["http://127.0.0.1:9", "http://hub.slmops-test.invalid"], ids=["refused", "no-dns"]
)
def test_an_unreachable_hub_is_retried_then_named_with_what_to_do(
    prefect_harness: None, tmp_path: Path, endpoint: str
) -> None:
    with pytest.raises(HubUnreachableError) as caught:
        in_flow(
            lambda: fetch_repo(
                MODEL, "main", MODEL_PATTERNS, tmp_path, endpoint=endpoint,
                retries=1, retry_backoff_s=FAST_BACKOFF_S,
            )
        )  # fmt: skip
    message = str(caught.value)
    assert f"Cannot reach the Hugging Face hub at {endpoint}" in message
    assert "HF_ENDPOINT" in message and "\n" not in message
    assert is_transient(caught.value)


def test_the_command_line_names_an_unreachable_hub_in_one_line(
    prefect_harness: None, tmp_path: Path
) -> None:
    import os
    import subprocess
    import sys

    from prefect.settings import PREFECT_API_URL

    # One quick retry: the retries run, without the default backoff's seconds of waiting.
    config = '{"hub": {"source": "hub", "repo_id": "microsoft/Phi-3-mini-4k-instruct", "onnx_repo_id": "microsoft/Phi-3-mini-4k-instruct-onnx", "retries": 1, "retry_backoff_s": 0.1}}'
    env = {
        **os.environ,
        "SLMOPS_HOME": str(tmp_path),
        "HF_ENDPOINT": "http://127.0.0.1:9",
        "PREFECT_API_URL": str(PREFECT_API_URL.value()),  # the session's server
    }
    done = subprocess.run(
        [sys.executable, "-m", "flows.release", config],
        cwd=Path(__file__).resolve().parents[2], env=env, capture_output=True, text=True,
        timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: Cannot reach the Hugging Face hub at http://127.0.0.1:9"), last
    assert "HF_ENDPOINT" in last
    assert "Retry 1/1 will start" in done.stdout + done.stderr  # transient: retried first
    assert "Traceback" not in done.stdout + done.stderr, done.stderr[-3000:]
