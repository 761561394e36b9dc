"""Retention planning: which registered versions' stored files may be deleted (pure: no MLflow).

A release stores three models (the transformers weights, two small ONNX wrappers) and one ONNX
folder that both ONNX wrappers reference (`tasks/onnx_storage.py`). Kept forever, every release
adds its full size to the artifact store. Retention keeps the newest `keep_last` released
versions (Production or Archived) of each registered model and deletes the files of the older
Archived ones.

A version is pruned, not deleted: the registry keeps its number, tags, audit trail and lineage,
and a `slmops.pruned` tag says when and why its files went; rollback and promotion refuse it.
Deleting the version instead would drop the audit entries of every move it ever made.

Never pruned: a version in Production or Staging, one with any alias, one not Archived (stage
None: never promoted, kept as evidence of a failed release), and one whose model files another
kept version also uses. A shared ONNX folder is deleted only when no kept version, and no live
logged model outside the registry (an in-flight release's wrapper), still names it.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from pydantic import BaseModel, ConfigDict

from slmops.promotion import Stage
from slmops.refs import AuditEntry


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class StoredVersion(_Frozen):
    """What retention needs to know of one registered version."""

    name: str
    version: int
    stage: Stage
    aliases: tuple[str, ...] = ()
    model_id: str | None  # the LoggedModel holding its files (None: not a logged model)
    artifact_uri: str  # where its model files are stored
    onnx_uri: str | None = None  # the shared ONNX folder its model_config names
    pruned: bool = False  # its files were deleted by an earlier prune


class VersionDecision(_Frozen):
    """Whether one version's files go, and why."""

    name: str
    version: int
    stage: Stage
    prune: bool
    reason: str
    # The shared ONNX folder to delete with this version (no kept version names it any more).
    delete_onnx_uri: str | None = None


class RetentionPlan(_Frozen):
    """The decision on every version of the registered models being pruned, newest first."""

    keep_last: int
    decisions: tuple[VersionDecision, ...]

    @property
    def pruned(self) -> tuple[VersionDecision, ...]:
        return tuple(d for d in self.decisions if d.prune)


def _keep_reason(version: StoredVersion, newest: Collection[int], keep_last: int) -> str | None:
    if version.version in newest:
        return f"one of the newest {keep_last} released"
    if version.stage in ("Production", "Staging"):
        return f"in {version.stage}"
    if version.aliases:
        return "has alias " + ", ".join(f"@{a}" for a in sorted(version.aliases))
    if version.stage != "Archived":
        return f"stage {version.stage}, not Archived"
    return None


def plan_retention(
    versions: Sequence[StoredVersion],
    names: Collection[str],
    keep_last: int,
    live_onnx_uris: Collection[str] = (),
) -> RetentionPlan:
    """Which versions of `names` to prune, keeping the newest `keep_last` of each.

    Args:
        versions: every registered version in the store (all registered models: a version of
            another model that shares files with a candidate protects them).
        names: the registered models to prune.
        keep_last: released versions (Production or Archived) kept per model, the newest by
            number.
        live_onnx_uris: ONNX folders named by live logged models that no version holds (a
            release between storing its ONNX folder and registering its wrappers).
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be at least 1, got {keep_last}")
    candidates: list[StoredVersion] = []
    decisions: dict[tuple[str, int], VersionDecision] = {}
    for name in sorted(names):
        mine = sorted((v for v in versions if v.name == name), key=lambda v: -v.version)
        # Slots go to released versions only: a newer release that failed (stage None) must
        # not push the last rollback target out.
        released = [v for v in mine if not v.pruned and v.stage in ("Production", "Archived")]
        newest = {v.version for v in released[:keep_last]}
        for v in mine:
            if v.pruned:
                reason: str | None = "already pruned"
            else:
                reason = _keep_reason(v, newest, keep_last)
            if reason is None:
                candidates.append(v)
            else:
                decisions[(v.name, v.version)] = VersionDecision(
                    name=v.name, version=v.version, stage=v.stage, prune=False, reason=reason
                )
    leaving = {(v.name, v.version) for v in candidates}
    kept = [v for v in versions if not v.pruned and (v.name, v.version) not in leaving]
    kept_models = {v.model_id: v for v in kept if v.model_id is not None}
    kept_onnx = {v.onnx_uri for v in kept if v.onnx_uri} | set(live_onnx_uris)
    # A candidate whose own files a kept version uses stays whole; its ONNX folder stays too.
    for v in candidates:
        sharer = kept_models.get(v.model_id) if v.model_id is not None else None
        if sharer is not None:
            kept_onnx |= {v.onnx_uri} if v.onnx_uri else set()
            decisions[(v.name, v.version)] = VersionDecision(
                name=v.name, version=v.version, stage=v.stage, prune=False,
                reason=f"its model files are also {sharer.name} v{sharer.version}'s",
            )  # fmt: skip
    onnx_claimed: set[str] = set()
    for v in candidates:
        if (v.name, v.version) in decisions:
            continue
        onnx = v.onnx_uri if v.onnx_uri and v.onnx_uri not in kept_onnx else None
        if onnx in onnx_claimed:
            onnx = None  # deleted with the first version that named it
        reason = f"Archived, older than the newest {keep_last}"
        if v.onnx_uri and onnx is None and v.onnx_uri not in onnx_claimed:
            reason += "; its ONNX folder stays (a kept version uses it)"
        if onnx is not None:
            onnx_claimed.add(onnx)
        decisions[(v.name, v.version)] = VersionDecision(
            name=v.name, version=v.version, stage=v.stage, prune=True, reason=reason,
            delete_onnx_uri=onnx,
        )  # fmt: skip
    ordered = sorted(decisions.values(), key=lambda d: (d.name, -d.version))
    return RetentionPlan(keep_last=keep_last, decisions=tuple(ordered))


class PrunedVersion(_Frozen):
    """What pruning one version did (or, in a dry run, would do)."""

    name: str
    version: int
    stage: Stage
    action: str  # pruned | would prune | kept
    reason: str
    freed_bytes: int | None = None  # local stores only
    deleted: tuple[str, ...] = ()  # artifact URIs deleted
    audit: AuditEntry | None = None  # as recorded on the version (pruned ones)


class PruneReport(_Frozen):
    """The outcome of one prune run, version by version."""

    keep_last: int
    dry_run: bool
    versions: tuple[PrunedVersion, ...]

    @property
    def freed_bytes(self) -> int:
        return sum(v.freed_bytes or 0 for v in self.versions)

    @property
    def pruned(self) -> tuple[PrunedVersion, ...]:
        return tuple(v for v in self.versions if v.action != "kept")

    def rows(self) -> list[dict[str, object]]:
        """One table row per version, for the Prefect UI."""
        return [
            {
                "model": v.name,
                "version": v.version,
                "stage": v.stage,
                "action": v.action,
                "reason": v.reason,
                "freed_mb": None if v.freed_bytes is None else round(v.freed_bytes / 1e6, 2),
                "by": v.audit.by if v.audit else "",
                "at": v.audit.at if v.audit else "",
            }
            for v in self.versions
        ]
