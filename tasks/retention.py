"""Retention in the MLflow store: delete the stored files of old Archived versions.

The plan is pure (`slmops.retention`); this module reads what it needs from the registry and
the logged models, and carries the plan out under the registry locks of every model it prunes,
so no promotion or rollback moves a version while its files are being judged or deleted.

For each pruned version, in this order:
1. the `slmops.pruned` tag (so a version whose deletion is cut short is refused as a rollback
   target, never served half-deleted);
2. its model files (the LoggedModel's artifact folder), through MLflow's artifact repository of
   that location (a local folder, S3, or an MLflow server's proxied store);
3. its LoggedModel, deleted: the release flow's cached logging (`tasks.caching`) reuses a logged
   model only while it exists, so re-releasing that commit logs it again rather than handing
   out a model without files;
4. the shared ONNX folder, if the plan says no kept version names it: its `store-onnx` run's
   files, the run tagged pruned and deleted (`store_onnx_folder` then stores it anew);
5. an audit entry, as registry moves record theirs (`tasks.registry.record_audit`).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models.model import MLMODEL_FILE_NAME
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from prefect import get_run_logger, task

from slmops import tags
from slmops.config import RegistryLockSpec
from slmops.onnx_genai_runtime import ONNX_URI_KEY
from slmops.retention import (
    PrunedVersion,
    PruneReport,
    RetentionPlan,
    StoredVersion,
    VersionDecision,
    plan_retention,
)
from slmops.store import ModelStore
from tasks.inplace_logging import local_artifact_dir
from tasks.locks import hold_lock
from tasks.registry import audit_entry, save_audit


def _every(search: Callable[..., Any], **kwargs: Any) -> Iterator[Any]:
    """Every result of a paged MLflow search, page after page."""
    token = None
    while True:
        page = search(page_token=token, **kwargs)
        yield from page
        token = page.token
        if not token:
            return


def stored_versions(client: MlflowClient) -> list[StoredVersion]:
    """Every registered version of every registered model in the store, with its files."""
    found: list[StoredVersion] = []
    for model in _every(client.search_registered_models):
        aliases: dict[int, list[str]] = {}
        for alias, version in (model.aliases or {}).items():
            aliases.setdefault(int(version), []).append(alias)
        for v in _every(client.search_model_versions, filter_string=f"name='{model.name}'"):
            source = str(v.source or "")
            model_id = source.removeprefix("models:/") if source.startswith("models:/m-") else None
            artifact_uri = client.get_model_version_download_uri(model.name, v.version)
            onnx_uri = None
            try:
                if model_id is None:
                    raise MlflowException("not a logged model")
                params = client.get_logged_model(model_id).params or {}
                onnx_uri = params.get(tags.ONNX_ARTIFACT_URI_PARAM) or None
            except MlflowException:  # its LoggedModel deleted (pruned, or by hand)
                if tags.PRUNED not in (v.tags or {}):
                    onnx_uri = _onnx_uri_in_mlmodel(artifact_uri)
            # Validated: a stage MLflow does not document is an error, not a new state.
            found.append(
                StoredVersion.model_validate(
                    {
                        "name": model.name,
                        "version": int(v.version),
                        "stage": v.current_stage or "None",
                        "aliases": tuple(sorted(aliases.get(int(v.version), []))),
                        "model_id": model_id,
                        "artifact_uri": artifact_uri,
                        "onnx_uri": onnx_uri,
                        "pruned": tags.PRUNED in (v.tags or {}),
                    }
                )
            )
    return found


def _onnx_uri_in_mlmodel(artifact_uri: str) -> str | None:
    """The ONNX folder named in a model's MLmodel (what its wrapper loads), if it names one."""
    folder = local_artifact_dir(artifact_uri)
    try:
        if folder is not None:
            text = (folder / MLMODEL_FILE_NAME).read_text()
        else:
            text = mlflow.artifacts.load_text(f"{artifact_uri}/{MLMODEL_FILE_NAME}")
    except (OSError, MlflowException):
        return None
    config = yaml.safe_load(text).get("flavors", {}).get("python_function", {}).get("config")
    return (config or {}).get(ONNX_URI_KEY) or None


def unregistered_onnx_uris(client: MlflowClient, registered: Sequence[StoredVersion]) -> set[str]:
    """ONNX folders named by live logged models that no registered version holds: wrappers of a
    release that has not registered them yet (or never will: failed validation, killed)."""
    held = {v.model_id for v in registered if v.model_id is not None}
    experiments = [e.experiment_id for e in _every(client.search_experiments)]
    uris: set[str] = set()
    if not experiments:
        return uris
    for model in _every(client.search_logged_models, experiment_ids=experiments):
        uri = (model.params or {}).get(tags.ONNX_ARTIFACT_URI_PARAM)
        if uri and model.model_id not in held:
            uris.add(uri)
    return uris


def _bytes_at(uri: str) -> int | None:
    folder = local_artifact_dir(uri)
    if folder is None:
        return None
    if not folder.exists():
        return 0
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def _delete_files(uri: str) -> None:
    folder = local_artifact_dir(uri)
    if folder is not None and not folder.exists():
        return  # already gone (a prune cut short, or two versions of one logged model)
    get_artifact_repository(uri).delete_artifacts()


def _onnx_run_id(client: MlflowClient, onnx_uri: str) -> str | None:
    """The `store-onnx` run whose artifacts hold `onnx_uri` (`<run artifact uri>/onnx_model`)."""
    for part in reversed(onnx_uri.rstrip("/").split("/")):
        if len(part) == 32 and all(c in "0123456789abcdef" for c in part):
            with contextlib.suppress(MlflowException):
                run = client.get_run(part)
                if onnx_uri.startswith(run.info.artifact_uri):
                    return part
    return None


def _prune_one(
    client: MlflowClient, version: StoredVersion, decision: VersionDecision, reason: str
) -> PrunedVersion:
    deleted = [version.artifact_uri]
    if decision.delete_onnx_uri:
        deleted.append(decision.delete_onnx_uri)
    sizes = [_bytes_at(uri) for uri in deleted]
    freed = None if any(s is None for s in sizes) else sum(s or 0 for s in sizes)
    what = "model files" + (" and the shared ONNX folder" if decision.delete_onnx_uri else "")
    entry = audit_entry(
        version.name,
        version.version,
        f"version {version.version} pruned ({what} deleted)",
        f"{reason}: {decision.reason}",
    )
    client.set_model_version_tag(
        version.name,
        str(version.version),
        tags.PRUNED,
        json.dumps({"at": entry.at, "by": entry.by, "reason": reason, "deleted": deleted}),
    )
    _delete_files(version.artifact_uri)
    if version.model_id is not None:
        with contextlib.suppress(MlflowException):  # already deleted
            client.delete_logged_model(version.model_id)
    if decision.delete_onnx_uri:
        _delete_files(decision.delete_onnx_uri)
        run_id = _onnx_run_id(client, decision.delete_onnx_uri)
        if run_id is not None:
            client.set_tag(run_id, tags.PRUNED, json.dumps({"at": entry.at, "reason": reason}))
            client.delete_run(run_id)
    return PrunedVersion(
        name=version.name, version=version.version, stage=version.stage, action="pruned",
        reason=decision.reason, freed_bytes=freed, deleted=tuple(deleted),
        audit=save_audit(client, entry),
    )  # fmt: skip


def _kept(decision: VersionDecision, action: str = "kept") -> PrunedVersion:
    return PrunedVersion(
        name=decision.name, version=decision.version, stage=decision.stage, action=action,
        reason=decision.reason,
    )  # fmt: skip


@task
def prune_versions(
    store: ModelStore,
    names: Sequence[str],
    keep_last: int,
    reason: str,
    locks: RegistryLockSpec | Path | None,
    dry_run: bool = False,
) -> PruneReport:
    """Delete the stored files of the Archived versions of `names` older than the newest
    `keep_last`, and mark them pruned (see `slmops.retention` for what is never touched).

    Args:
        store: the MLflow store holding the registry and the artifacts.
        names: registered models to prune (absent ones are skipped).
        keep_last: released versions (Production or Archived) kept per model.
        reason: why, for the audit trail.
        locks: the registry locks (a folder: file locks there); every model's is held.
        dry_run: plan and report only; nothing is deleted or tagged.
    """
    client = store.client()
    logger = get_run_logger()
    with contextlib.ExitStack() as held:
        for name in sorted(set(names)):  # one order: two prunes cannot deadlock
            held.enter_context(hold_lock(locks, name))
        versions = stored_versions(client)
        plan: RetentionPlan = plan_retention(
            versions, names, keep_last, unregistered_onnx_uris(client, versions)
        )
        by_key = {(v.name, v.version): v for v in versions}
        outcomes: list[PrunedVersion] = []
        for decision in plan.decisions:
            if not decision.prune:
                outcomes.append(_kept(decision))
            elif dry_run:
                outcomes.append(_kept(decision, "would prune"))
            else:
                outcome = _prune_one(
                    client, by_key[(decision.name, decision.version)], decision, reason
                )
                outcomes.append(outcome)
                logger.info(
                    "%s v%s pruned (%s): %s",
                    decision.name,
                    decision.version,
                    decision.reason,
                    ", ".join(outcome.deleted),
                )
    return PruneReport(keep_last=keep_last, dry_run=dry_run, versions=tuple(outcomes))
