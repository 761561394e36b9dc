"""MLflow Model Registry tasks: register validated models, promote and roll back versions.

Every stage or alias move is applied from a plan (`slmops.promotion`), recorded as an audit tag
on the model version, and compensated if a later move fails, so a failed promotion leaves the
previous Production/champion in place. Registrations and moves on one registered model are
serialised by a lock (`tasks.locks`: a file lock on one host, a Prefect concurrency limit across
hosts), so two release runs at once can neither interleave their moves nor register one logged
model twice.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import uuid
import warnings
from datetime import UTC, datetime
from pathlib import Path

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from prefect import get_run_logger, task
from prefect.context import get_run_context

from slmops import tags
from slmops.config import RegistryLockSpec
from slmops.errors import ExplainedError
from slmops.promotion import (
    CHAMPION,
    RegistryMove,
    RegistryState,
    plan_moves,
    production_state,
    rollback_state,
    staging_state,
)
from slmops.refs import AuditEntry, ModelVersionRef, PromotionReport
from slmops.store import ModelStore
from tasks.locks import hold_lock
from tasks.retrying import retry_if_transient

AUDIT_TAG_PREFIX = tags.AUDIT_PREFIX
SOURCE_MODEL_TAG = tags.SOURCE_MODEL_URI
SOURCE_REPO_TAG = tags.SOURCE_REPO_ID  # on a registered model: the one repo of its versions


class RegistryConflictError(ExplainedError):
    """A registered model holds releases of another source repo than the one being registered."""


class PrunedVersionError(ExplainedError):
    """The version's stored files were deleted by retention (the prune flow): it cannot be
    served again, so it is no rollback or promotion target."""


def refuse_pruned(client: MlflowClient, name: str, version: int, action: str) -> None:
    """Raise PrunedVersionError if `name` v`version` was pruned, naming the versions that
    still have their files."""
    try:
        found = client.get_model_version(name, str(version))
    except MlflowException:
        return  # not registered: the planner says so in its own words
    record = (found.tags or {}).get(tags.PRUNED)
    if record is None:
        return
    when = json.loads(record)
    others = [
        f"v{v.version} ({v.current_stage})"
        for v in sorted(
            client.search_model_versions(f"name='{name}'"), key=lambda v: -int(v.version)
        )
        if tags.PRUNED not in (v.tags or {}) and int(v.version) != version
    ]
    raise PrunedVersionError(
        f"cannot {action} {name} v{version}: it was pruned on {when.get('at', '?')} "
        f"({when.get('reason', 'retention')}), its model files are deleted and it can no longer "
        f"be served. Versions that still have their files: {', '.join(others) or 'none'}"
    )


def default_locks(store: ModelStore) -> Path | None:
    """`locks/` beside a SQLite store's database, which every process using the store can see
    (the release flow's `<home>/locks`); None for other stores."""
    database = store.database
    return database.parent / "locks" if database is not None else None


def read_state(client: MlflowClient, name: str) -> RegistryState:
    versions = client.search_model_versions(f"name='{name}'")
    stages = {int(v.version): (v.current_stage or "None") for v in versions}
    aliases = client.get_registered_model(name).aliases or {}
    # Validated: a stage MLflow does not document is an error here, not a silent new state.
    return RegistryState.model_validate(
        {"stages": stages, "aliases": {a: int(v) for a, v in aliases.items()}}
    )


def _flow_run_name() -> str | None:
    with contextlib.suppress(Exception):
        ctx = get_run_context()
        run = getattr(ctx, "flow_run", None) or getattr(
            getattr(ctx, "task_run", None), "flow_run_id", None
        )
        return str(getattr(run, "name", run)) if run else None
    return None


def _apply(client: MlflowClient, name: str, move: RegistryMove, reason: str) -> AuditEntry:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # stages are deprecated, still supported
        if move.kind == "stage":
            client.transition_model_version_stage(
                name, str(move.version), move.stage, archive_existing_versions=move.archive_existing
            )
        elif move.alias is None:
            raise ValueError(f"an alias move names no alias: {move}")
        elif move.kind == "set_alias":
            client.set_registered_model_alias(name, move.alias, str(move.version))
        else:
            client.delete_registered_model_alias(name, move.alias)
    return record_audit(client, name, move.version, move.describe(), reason)


def audit_entry(name: str, version: int | None, move: str, reason: str) -> AuditEntry:
    """An audit entry for `move`, made now by this user in this flow run."""
    return AuditEntry(
        name=name,
        version=version,
        move=move,
        reason=reason,
        by=getpass.getuser(),
        at=datetime.now(UTC).isoformat(timespec="milliseconds"),
        flow_run=_flow_run_name(),
    )


def record_audit(
    client: MlflowClient, name: str, version: int | None, move: str, reason: str
) -> AuditEntry:
    """Record one registry change as an audit tag on the version it changed (`audit_trail`)."""
    return save_audit(client, audit_entry(name, version, move, reason))


def save_audit(client: MlflowClient, entry: AuditEntry) -> AuditEntry:
    """Store `entry` as an audit tag on its version (none for an entry without a version)."""
    if entry.version is not None:
        stamp = entry.at.replace(":", "").replace("+", "Z")
        key = f"{AUDIT_TAG_PREFIX}{stamp}.{uuid.uuid4().hex[:8]}"  # unique within a millisecond
        client.set_model_version_tag(entry.name, str(entry.version), key, entry.model_dump_json())
    return entry


def reach_state(
    client: MlflowClient, name: str, desired: RegistryState, reason: str
) -> list[AuditEntry]:
    """Apply the moves to `desired`; if one fails, restore the state from before and re-raise."""
    before = read_state(client, name)
    audit: list[AuditEntry] = []
    try:
        for move in plan_moves(before, desired):
            audit.append(_apply(client, name, move, reason))
    except Exception:
        for move in plan_moves(read_state(client, name), before):
            audit.append(_apply(client, name, move, f"compensation: {reason} failed"))
        raise
    return audit


@task(retries=2, retry_delay_seconds=2, retry_condition_fn=retry_if_transient)
def register_version(
    store: ModelStore,
    model_uri: str,
    name: str,
    tags: dict[str, str],
    locks: RegistryLockSpec | Path | None = None,
) -> ModelVersionRef:
    """Register `model_uri` as a new version of `name`, or return the version already holding it.

    Registering the same logged model twice (a cached re-run, or two runs at once that share a
    cached logged model) must not add a duplicate version: the look-up and the creation hold
    the model's registry lock.

    Args:
        store: the MLflow store holding the logged model and the registry.
        model_uri: the logged model (`models:/m-...`).
        name: registered model name (created if absent).
        tags: model version tags.
        locks: the per-model registry lock (a folder: file locks there; default:
            `default_locks(store)`).
    """
    if not model_uri.startswith("models:/m-"):
        raise ValueError(f"expected a logged model URI (models:/m-...), got {model_uri!r}")
    client = store.client()
    locks = locks if locks is not None else default_locks(store)
    # MLflow resolves a `models:/m-...` source through the process-wide tracking URI, not the
    # client's (sqlalchemy_store.create_model_version), so it is pointed at this store.
    with hold_lock(locks, name), store.activated():
        with contextlib.suppress(MlflowException):
            client.create_registered_model(name)
        _claim_for_repo(client, name, tags.get(SOURCE_REPO_TAG))
        for existing in client.search_model_versions(f"name='{name}'"):
            if (existing.tags or {}).get(SOURCE_MODEL_TAG) == model_uri:
                return ModelVersionRef(name=name, version=int(existing.version))
        model_id = model_uri.removeprefix("models:/")
        logged = client.get_logged_model(model_id)
        version = client.create_model_version(
            name,
            source=model_uri,
            run_id=logged.source_run_id,
            model_id=model_id,
            tags={**tags, SOURCE_MODEL_TAG: model_uri},
        )
    get_run_logger().info("Registered %s as %s version %s", model_uri, name, version.version)
    return ModelVersionRef(name=name, version=int(version.version))


def _claim_for_repo(client: MlflowClient, name: str, repo_id: str | None) -> None:
    """Tie registered model `name` to `repo_id` on its first registration; refuse another repo.

    Without this, a release of the embedded tiny model with the real model's registry names
    would put the tiny model into Production over a real Phi-3-mini release.
    """
    if not repo_id:
        return
    owner = client.get_registered_model(name).tags.get(SOURCE_REPO_TAG)
    if owner is None:
        client.set_registered_model_tag(name, SOURCE_REPO_TAG, repo_id)
    elif owner != repo_id:
        raise RegistryConflictError(
            f"registered model {name!r} holds releases of {owner}, not {repo_id}: nothing was "
            "registered. Give this model its own registry.name_prefix."
        )


def _promote(
    client: MlflowClient, ref: ModelVersionRef, reason: str, locks: RegistryLockSpec | Path
) -> PromotionReport:
    with hold_lock(locks, ref.name):
        current = read_state(client, ref.name)
        previous = current.production_version()
        if previous == ref.version and current.aliases.get(CHAMPION) == ref.version:
            # Already the champion (a re-run with unchanged inputs): moving it back through
            # Staging would leave the model without a Production version for a moment.
            return PromotionReport(
                name=ref.name,
                production_version=ref.version,
                previous_production=previous,
                audit=(),
            )
        audit = reach_state(
            client, ref.name, staging_state(read_state(client, ref.name), ref.version), reason
        )
        audit += reach_state(
            client, ref.name, production_state(read_state(client, ref.name), ref.version), reason
        )
    return PromotionReport(
        name=ref.name,
        production_version=ref.version,
        previous_production=previous,
        audit=tuple(audit),
    )


@task
def promote_version(
    store: ModelStore, ref: ModelVersionRef, reason: str, locks: RegistryLockSpec | Path
) -> PromotionReport:
    """None -> Staging (@challenger) -> Production (@champion), archiving the old Production.

    `locks`: the per-model registry lock (a folder: file locks there)."""
    client = store.client()
    refuse_pruned(client, ref.name, ref.version, "promote")
    version = client.get_model_version(ref.name, str(ref.version))
    if (version.tags or {}).get(tags.VALIDATION_PASSED) != "true":
        raise ValueError(
            f"{ref.uri} has not passed validation (tag {tags.VALIDATION_PASSED}="
            f"{(version.tags or {}).get(tags.VALIDATION_PASSED)!r}); refusing to promote it"
        )
    report = _promote(client, ref, reason, locks)
    get_run_logger().info(
        "%s: Production is now version %s (was %s)",
        ref.name,
        ref.version,
        report.previous_production,
    )
    return report


@task
def rollback_version(
    store: ModelStore, ref: ModelVersionRef, reason: str, locks: RegistryLockSpec | Path
) -> PromotionReport:
    """Put an earlier version back in Production as champion, archiving the current one.

    `locks`: the per-model registry lock (a folder: file locks there)."""
    client = store.client()
    with hold_lock(locks, ref.name):
        refuse_pruned(client, ref.name, ref.version, "roll back to")
        current = read_state(client, ref.name)
        previous = current.production_version()
        audit = reach_state(client, ref.name, rollback_state(current, ref.version), reason)
    return PromotionReport(
        name=ref.name,
        production_version=ref.version,
        previous_production=previous,
        audit=tuple(audit),
    )


def audit_trail(store: ModelStore, name: str) -> list[AuditEntry]:
    """Every recorded stage/alias move of `name`, oldest first."""
    client = store.client()
    entries = []
    for version in client.search_model_versions(f"name='{name}'"):
        for key, value in (version.tags or {}).items():
            if key.startswith(AUDIT_TAG_PREFIX):
                entries.append(AuditEntry(**json.loads(value)))
    return sorted(entries, key=lambda e: e.at)


def champion_version(store: ModelStore, name: str) -> ModelVersionRef | None:
    """The version behind `models:/name@champion`, or None if there is none yet."""
    client = store.client()
    try:
        version = client.get_model_version_by_alias(name, "champion")
    except MlflowException:
        return None
    return ModelVersionRef(name=name, version=int(version.version))
