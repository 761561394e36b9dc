"""Hugging Face hub tasks: resolve a revision to its commit, fetch a verified snapshot of it.

Downloads go through the real `huggingface_hub` client, against huggingface.co, a mirror, or the
loopback `offline_kit.fake_hub`; every fetched file is then checked against the hub's checksums.
Retries cover transient failures only (5xx, timeouts, dropped connections, checksum mismatches);
a gated, missing or unauthorised repo fails at once, saying what to do. The token is a
`SecretStr`: it is unwrapped only at the client call, takes no part in cache keys, and never
reaches a result or a log.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from huggingface_hub import HfApi, get_cached_repo_tree, snapshot_download
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import (
    CachedRepoTreeNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.hf_api import RepoSibling
from huggingface_hub.utils import filter_repo_objects
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE, CachePolicy, TaskSource
from prefect.context import TaskRunContext
from prefect.exceptions import MissingContextError
from prefect.tasks import exponential_backoff
from prefect.utilities.hashing import hash_objects
from pydantic import BaseModel, ConfigDict, SecretStr

from slmops.config import HubSpec, Settings
from slmops.errors import ExplainedError, TransientError
from slmops.refs import SnapshotRef
from tasks.retrying import (
    RETRYABLE_STATUS,
    TRANSPORT_ERRORS,
    http_status,
    retry_if_transient,
)

COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")

# Defaults for the hub; tests and flows pass smaller ones through `fetch_repo` / `with_options`.
HUB_TIMEOUT_S = 10.0  # read timeout of each hub request, metadata and file content alike
FETCH_RETRIES = HubSpec.model_fields["retries"].default
RETRY_BACKOFF_S = HubSpec.model_fields["retry_backoff_s"].default  # first delay; then doubles


class HubAccessError(ExplainedError):
    """The hub said no (gated, missing, unauthorised, bad request): retrying cannot help."""


class HubUnreachableError(ExplainedError, TransientError):
    """No answer from the hub (network, name resolution, proxy): transient, so retried."""


class SnapshotVerificationError(TransientError):
    """Fetched files differ from the hub's checksums; they were removed from the cache."""

    def __init__(self, message: str, files: Sequence[str]):
        super().__init__(message)
        self.files = tuple(files)

    def __reduce__(self) -> tuple[Any, ...]:  # Prefect pickles a failed task's exception
        return type(self), (str(self), self.files)


def snapshot_dir(cache_dir: Path, repo_id: str, commit: str) -> Path:
    """Where huggingface_hub puts the snapshot of `repo_id` at `commit` under `cache_dir`."""
    root = Path(cache_dir).expanduser().resolve()
    return root / repo_folder_name(repo_id=repo_id, repo_type="model") / "snapshots" / commit


def snapshot_is_complete(
    repo_id: str, commit: str, allow_patterns: Sequence[str] | None, cache_dir: Path
) -> bool:
    """Whether the HF cache holds every file of the snapshot that `allow_patterns` select.

    Reads only the local cache (the tree listing huggingface_hub keeps per commit): no network.
    """
    folder = snapshot_dir(cache_dir, repo_id, commit)
    if not folder.is_dir():
        return False
    try:
        tree = get_cached_repo_tree(repo_id, revision=commit, cache_dir=cache_dir)
    except CachedRepoTreeNotFoundError:
        return False
    wanted = list(filter_repo_objects(tree, allow_patterns=_patterns(allow_patterns), key=_path))
    return bool(wanted) and all((folder / f.path).is_file() for f in wanted)


@dataclass
class SnapshotCachePolicy(CachePolicy):
    """Cache key of `fetch_snapshot`: what fixes the files, plus the task's source code.

    The key covers repo, commit, requested revision, patterns and cache folder; not the token
    (any token that can read the commit gets the same bytes), not the endpoint (a commit is
    content-addressed, and the fake hub's port changes per run), not timeouts. While the
    snapshot is incomplete on disk there is no key, so a cached result whose folder has since
    vanished is never served: the task runs again. `require_complete=False` keys regardless,
    for a run with `refresh_cache=True` that overwrites such a stale record (see `fetch_repo`).
    """

    require_complete: bool = True

    def compute_key(
        self,
        task_ctx: TaskRunContext,
        inputs: dict[str, Any],
        flow_parameters: dict[str, Any],
        **kwargs: Any,
    ) -> str | None:
        repo_id, commit = inputs["repo_id"], inputs["commit"]
        cache_dir = Path(inputs["cache_dir"]).expanduser().resolve()
        patterns = _patterns(inputs.get("allow_patterns"))
        if self.require_complete and not snapshot_is_complete(repo_id, commit, patterns, cache_dir):
            return None
        return hash_objects(
            TaskSource().compute_key(task_ctx, inputs, flow_parameters),
            repo_id,
            commit,
            inputs.get("revision") or commit,
            sorted(patterns) if patterns is not None else None,
            str(cache_dir),
            raise_on_failure=True,
        )


_RETRY_OPTIONS: dict[str, Any] = dict(
    retries=FETCH_RETRIES,
    retry_delay_seconds=exponential_backoff(RETRY_BACKOFF_S),
    retry_condition_fn=retry_if_transient,
)


@task(name="resolve_revision", cache_policy=NO_CACHE, **_RETRY_OPTIONS)
def resolve_revision(
    repo_id: str,
    revision: str,
    endpoint: str | None,
    token: SecretStr | None = None,
    *,
    timeout_s: float = HUB_TIMEOUT_S,
) -> str:
    """The commit that `revision` (a branch, tag or commit) of `repo_id` points to now.

    Branches move, so this is never cached. A commit is returned as is, without asking the hub.

    Args:
        repo_id: "owner/name".
        revision: branch, tag or 40-hex commit.
        endpoint: hub URL (None: huggingface.co, or HF_ENDPOINT as read when huggingface_hub
            was imported).
        token: read token for gated or private repos (None: send none).
        timeout_s: read timeout of the request.
    """
    if COMMIT_RE.fullmatch(revision):
        return revision
    try:
        info = HfApi(endpoint=endpoint).model_info(
            repo_id, revision=revision, token=_secret(token), timeout=timeout_s
        )
    except HfHubHTTPError as error:
        _raise_if_refused(error, repo_id, revision, endpoint, token)
        raise
    except Exception as error:
        _raise_if_unreachable(error, endpoint)
        raise
    if not info.sha or not COMMIT_RE.fullmatch(info.sha):
        raise HubAccessError(f"{_hub(endpoint)} gave no commit for {repo_id}@{revision}")
    _logger().info("%s@%s is commit %s", repo_id, revision, info.sha)
    return info.sha


@task(
    name="fetch_snapshot",
    cache_policy=SnapshotCachePolicy(),
    persist_result=True,
    **_RETRY_OPTIONS,
)
def fetch_snapshot(
    repo_id: str,
    commit: str,
    allow_patterns: Sequence[str] | None,
    cache_dir: Path,
    endpoint: str | None,
    token: SecretStr | None = None,
    *,
    revision: str | None = None,
    timeout_s: float = HUB_TIMEOUT_S,
) -> SnapshotRef:
    """Download `repo_id` at `commit` into the HF cache and verify every file's checksum.

    Files are checked against the hub's metadata: sha256 for LFS files, the git blob sha1 for
    the others. A file that does not match is removed from the cache and the task fails with a
    retryable `SnapshotVerificationError` naming it, so the retry downloads it again.

    Args:
        repo_id: "owner/name".
        commit: the 40-hex commit to fetch (from `resolve_revision`).
        allow_patterns: glob patterns of the files to fetch (None: all), e.g.
            `("*.json", "*.safetensors")` or `("cpu_and_mobile/cpu-int4-rtn-block-32-acc-level-4/*",)`.
        cache_dir: the Hugging Face cache folder to download into.
        endpoint: hub URL (None: huggingface.co).
        token: read token for gated or private repos (None: send none).
        revision: the revision `commit` was resolved from, recorded in the result.
        timeout_s: read timeout of each request. huggingface_hub 2.4 takes the file-download
            timeout from a module constant only: it is set for the download and restored
            after (`_download_timeout`).
    """
    if not COMMIT_RE.fullmatch(commit):
        raise ValueError(f"commit must be 40 hex characters (see resolve_revision), got {commit!r}")
    logger = _logger()
    patterns = _patterns(allow_patterns)
    secret = _secret(token)
    try:
        info = HfApi(endpoint=endpoint).model_info(
            repo_id, revision=commit, files_metadata=True, token=secret, timeout=timeout_s
        )
        expected = list(
            filter_repo_objects(info.siblings or [], allow_patterns=patterns, key=_rfilename)
        )
        if not expected:
            raise HubAccessError(
                f"No file of {repo_id}@{commit[:12]} matches allow_patterns {patterns}: "
                "check the patterns (and the subfolder, for an ONNX release)"
            )
        logger.info(
            "Fetching %d files of %s@%s from %s",
            len(expected),
            repo_id,
            commit[:12],
            _hub(endpoint),
        )
        with _download_timeout(timeout_s):
            folder = Path(
                snapshot_download(
                    repo_id,
                    revision=commit,
                    allow_patterns=patterns,
                    cache_dir=cache_dir,
                    endpoint=endpoint,
                    token=secret,
                    etag_timeout=timeout_s,
                )
            )
    except HfHubHTTPError as error:
        _raise_if_refused(error, repo_id, revision or commit, endpoint, token)
        raise
    except Exception as error:
        _raise_if_unreachable(error, endpoint)
        raise
    verify_snapshot(folder, expected)
    size = sum(s.size or 0 for s in expected)
    logger.info("Verified %d files (%.1f MB) in %s", len(expected), size / 1e6, folder)
    return SnapshotRef(
        repo_id=repo_id,
        revision=revision or commit,
        commit=commit,
        path=folder,
        files=tuple(sorted(s.rfilename for s in expected)),
    )


# Downloads in one process share huggingface_hub's module constant: one at a time changes it.
_DOWNLOAD_TIMEOUT_LOCK = threading.Lock()


@contextlib.contextmanager
def _download_timeout(timeout_s: float) -> Iterator[None]:
    """huggingface_hub's file-download timeout set to `timeout_s` for one block, then restored
    (2.4 reads it from a module constant, with no per-call argument)."""
    with _DOWNLOAD_TIMEOUT_LOCK:
        previous = hf_constants.HF_HUB_DOWNLOAD_TIMEOUT
        hf_constants.HF_HUB_DOWNLOAD_TIMEOUT = timeout_s  # type: ignore[assignment]  # a float works
        try:
            yield
        finally:
            hf_constants.HF_HUB_DOWNLOAD_TIMEOUT = previous


def verify_snapshot(folder: Path, expected: Sequence[RepoSibling]) -> None:
    """Check each expected file under `folder` against the hub's checksum.

    Files are hashed in parallel threads (`file_digests`), so a two-shard checkpoint is checked
    at the speed of two cores rather than one.

    Raises:
        SnapshotVerificationError: naming every missing or mismatching file; mismatching ones
            are removed from the cache first (snapshot link and blob).
    """
    problems: list[str] = []
    checks: list[tuple[RepoSibling, Path, Checksum, str]] = []
    for sibling in expected:
        local = folder / sibling.rfilename
        if not local.is_file():
            problems.append(f"{sibling.rfilename} (missing)")
            continue
        if sibling.lfs is not None:
            checks.append((sibling, local, "sha256", sibling.lfs.sha256))
        elif sibling.blob_id:
            checks.append((sibling, local, "git blob sha1", sibling.blob_id))
        else:
            raise HubAccessError(f"the hub gave no checksum for {sibling.rfilename}: cannot verify")
    found = file_digests([(local, algorithm) for _, local, algorithm, _ in checks])
    for (sibling, local, algorithm, want), got in zip(checks, found, strict=True):
        if got != want:
            _evict(local)
            problems.append(f"{sibling.rfilename} ({algorithm} {got}, expected {want})")
    if problems:
        raise SnapshotVerificationError(
            f"{len(problems)} file(s) in {folder} failed verification (removed from the cache, "
            f"a retry downloads them again): {'; '.join(problems)}",
            [p.split(" (", 1)[0] for p in problems],
        )


def fetch_repo(
    repo_id: str,
    revision: str,
    allow_patterns: Sequence[str] | None,
    cache_dir: Path,
    *,
    endpoint: str | None = None,
    token: SecretStr | None = None,
    retries: int = FETCH_RETRIES,
    retry_backoff_s: float = RETRY_BACKOFF_S,
    timeout_s: float = HUB_TIMEOUT_S,
) -> SnapshotRef:
    """Resolve `revision`, then fetch that commit (both tasks); call it inside a flow.

    When the snapshot is incomplete on disk, the fetch runs with `refresh_cache=True` so that
    a stale cached result (its folder deleted since) is overwritten rather than left behind.
    """
    delays = exponential_backoff(retry_backoff_s)
    commit = resolve_revision.with_options(retries=retries, retry_delay_seconds=delays)(
        repo_id, revision, endpoint, token, timeout_s=timeout_s
    )
    fetch = fetch_snapshot.with_options(retries=retries, retry_delay_seconds=delays)
    patterns = tuple(allow_patterns) if allow_patterns is not None else None
    if not snapshot_is_complete(repo_id, commit, patterns, cache_dir):
        fetch = fetch.with_options(
            cache_policy=SnapshotCachePolicy(require_complete=False), refresh_cache=True
        )
    return fetch(
        repo_id,
        commit,
        patterns,
        Path(cache_dir),
        endpoint,
        token,
        revision=revision,
        timeout_s=timeout_s,
    )


class HubConnection(BaseModel):
    """Where a release downloads from, and with which token (see flows._hubs for the choice)."""

    model_config = ConfigDict(frozen=True)

    endpoint: str | None  # None: huggingface.co
    token: SecretStr | None = None
    cache_dir: Path  # the Hugging Face cache to download into


def hf_cache_dir(settings: Settings) -> Path:
    """The Hugging Face cache folder the pipeline downloads into."""
    return settings.cache_dir / "huggingface"


def fetch_model_snapshot(spec: HubSpec, hub: HubConnection) -> SnapshotRef:
    """The model files `spec` names (`repo_id@revision`, `allow_patterns`), verified.

    Args:
        spec: which repo, revision and files.
        hub: where to download from, with which token, into which cache.
    """
    return fetch_repo(
        spec.repo_id,
        spec.revision,
        spec.allow_patterns,
        hub.cache_dir,
        endpoint=hub.endpoint,
        token=hub.token,
        retries=spec.retries,
        retry_backoff_s=spec.retry_backoff_s,
    )


def fetch_onnx_release(spec: HubSpec, hub: HubConnection) -> Path:
    """The hub's ONNX release of the model: its `spec.onnx_subfolder` folder, verified.

    The ONNX repo has its own history, so it is pinned by `spec.onnx_revision`, not by the
    weights repo's `spec.revision`.
    """
    subfolder = spec.onnx_subfolder.strip("/")
    ref = fetch_repo(
        spec.onnx_repo_id,
        spec.onnx_revision,
        (f"{subfolder}/*",),
        hub.cache_dir,
        endpoint=hub.endpoint,
        token=hub.token,
        retries=spec.retries,
        retry_backoff_s=spec.retry_backoff_s,
    )
    return ref.path / subfolder


def _secret(token: SecretStr | None) -> str | bool:
    # False rather than None: None makes huggingface_hub fall back to a token stored on the
    # machine; the pipeline sends exactly the token it was given (Settings reads HF_TOKEN).
    return token.get_secret_value() if token is not None else False


def _raise_if_refused(
    error: HfHubHTTPError,
    repo_id: str,
    revision: str,
    endpoint: str | None,
    token: SecretStr | None,
) -> None:
    """Re-raise a definite "no" from the hub as a HubAccessError saying what to do."""
    hub = _hub(endpoint)
    status = http_status(error)
    if isinstance(error, GatedRepoError):
        why = "the token given has no access" if token is not None else "no token was given"
        message = (
            f"{repo_id} is a gated repository on {hub} ({why}): accept its conditions at "
            f"{hub}/{repo_id} with your account, then set HF_TOKEN to a read token of that account"
        )
    elif isinstance(error, RepositoryNotFoundError):
        message = (
            f"Repository {repo_id} was not found on {hub}: check the repo id (HubSpec.repo_id); "
            "if it is private, set HF_TOKEN to a token that can read it"
        )
    elif isinstance(error, RevisionNotFoundError):
        message = (
            f"Revision {revision!r} does not exist in {repo_id} on {hub}: check HubSpec.revision"
        )
    elif isinstance(error, RemoteEntryNotFoundError):
        message = f"A file of {repo_id}@{revision} is missing on {hub}: {error.server_message}"
    elif status in (401, 403):
        message = (
            f"{hub} refused access to {repo_id} (HTTP {status}): set HF_TOKEN to a valid token "
            "that can read it"
        )
    elif status is not None and 400 <= status < 500 and status not in RETRYABLE_STATUS:
        message = f"{hub} rejected the request for {repo_id}@{revision} (HTTP {status}): {error}"
    else:
        return
    raise HubAccessError(message) from error


def _raise_if_unreachable(error: BaseException, endpoint: str | None) -> None:
    """Re-raise network trouble (in `error` or its causes) as a HubUnreachableError saying what
    to check; anything else is left to the caller."""
    cause: BaseException | None = error
    while cause is not None and not isinstance(cause, TRANSPORT_ERRORS):
        cause = cause.__cause__ or cause.__context__
    if cause is None:
        return
    detail = str(cause).strip() or type(cause).__name__
    raise HubUnreachableError(
        f"Cannot reach the Hugging Face hub at {_hub(endpoint)} ({type(cause).__name__}: "
        f"{detail}). Check the network connection and proxy settings (HTTPS_PROXY), or set "
        "HF_ENDPOINT to a hub mirror that this machine can reach."
    ) from error


def _hub(endpoint: str | None) -> str:
    return (endpoint or hf_constants.ENDPOINT).rstrip("/")


def _patterns(allow_patterns: Sequence[str] | str | None) -> list[str] | None:
    if allow_patterns is None:
        return None
    return [allow_patterns] if isinstance(allow_patterns, str) else list(allow_patterns)


def _path(entry: Any) -> str:
    return entry.path


def _rfilename(sibling: RepoSibling) -> str:
    return sibling.rfilename


Checksum = Literal["sha256", "git blob sha1"]
# Reads of 8 MiB: fewer calls into hashlib (which releases the GIL while it hashes) than 1 MiB,
# and a buffer reused for the whole file.
_READ_BYTES = 8 << 20
# Files hashed at once; sha256 and sha1 run at over 1 GB/s a core on a CPU with SHA extensions,
# so a few threads are enough to reach the disk's speed.
HASH_THREADS = 4


def file_digest(path: Path, algorithm: Checksum) -> str:
    """The hex digest of `path`: its sha256, or its git blob sha1 (`sha1("blob <size>\\0" +
    content)`, what the hub reports for a file not stored in LFS)."""
    if algorithm == "sha256":
        digest = hashlib.sha256()
    else:
        digest = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    buffer = bytearray(_READ_BYTES)
    view = memoryview(buffer)
    with path.open("rb", buffering=0) as f:
        while size := f.readinto(buffer):
            digest.update(view[:size])
    return digest.hexdigest()


def file_digests(files: Sequence[tuple[Path, Checksum]], threads: int = HASH_THREADS) -> list[str]:
    """`file_digest` of each file, in order, the files hashed in parallel threads (the largest
    first, so that one big shard does not start last)."""
    if len(files) <= 1 or threads <= 1:
        return [file_digest(path, algorithm) for path, algorithm in files]
    order = sorted(range(len(files)), key=lambda i: -files[i][0].stat().st_size)
    with ThreadPoolExecutor(max_workers=min(threads, len(files))) as pool:
        futures = {i: pool.submit(file_digest, *files[i]) for i in order}
        return [futures[i].result() for i in range(len(files))]


def _evict(local: Path) -> None:
    """Remove a file from the HF cache: the snapshot's link, and the blob it points to."""
    blob = local.resolve() if local.is_symlink() else None
    local.unlink(missing_ok=True)
    if blob is not None:
        blob.unlink(missing_ok=True)


def _logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        return get_run_logger()
    except MissingContextError:  # called as `task.fn(...)`, outside a run
        return logging.getLogger(__name__)
