"""Small frozen references that tasks return instead of heavy objects."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from slmops.config import WrapperKind


class LoggedModelRef(BaseModel):
    """An MLflow LoggedModel: what `log_model` returned, and which wrapper it is."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model_uri: str  # models:/m-<id>, exactly as log_model returned it
    run_id: str
    kind: WrapperKind
    model_id: str


class SnapshotRef(BaseModel):
    """Files of one hub repo at one commit, downloaded and checksum-verified into the HF cache."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    repo_id: str
    revision: str  # as requested: a branch, a tag or a commit
    commit: str = Field(pattern=r"^[0-9a-f]{40}$")  # what `revision` resolved to
    path: Path  # the snapshot folder; files keep their repo-relative paths under it
    files: tuple[str, ...]  # repo-relative paths fetched (those `allow_patterns` matched)


class ModelVersionRef(BaseModel):
    """A registered model version."""

    model_config = ConfigDict(frozen=True)

    name: str
    version: int

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


class AuditEntry(BaseModel):
    """One stage or alias move of a registered model version, as recorded in its audit tags."""

    model_config = ConfigDict(frozen=True)

    name: str
    version: int | None
    move: str
    reason: str
    by: str
    at: str
    flow_run: str | None = None


class PromotionReport(BaseModel):
    """What a promotion or rollback changed: the Production version before and after, and how."""

    model_config = ConfigDict(frozen=True)

    name: str
    production_version: int | None
    previous_production: int | None
    audit: tuple[AuditEntry, ...]
