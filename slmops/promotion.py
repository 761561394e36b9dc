"""Promotion planning for the MLflow Model Registry (pure: no MLflow calls).

A registered model's lifecycle state is the stage of each version plus its aliases. Promotion,
rollback and the compensation of a failed move are all "reach this desired state": the planner
diffs the current state against the desired one and returns an ordered list of moves.

Stages mirror aliases: Staging <-> `challenger`, Production <-> `champion`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from pydantic import BaseModel, ConfigDict

Stage = Literal["None", "Staging", "Production", "Archived"]
CHALLENGER = "challenger"
CHAMPION = "champion"
ALIAS_FOR_STAGE: dict[str, str] = {"Staging": CHALLENGER, "Production": CHAMPION}


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class RegistryState(_Frozen):
    """Stages by version and alias -> version, for one registered model."""

    stages: dict[int, Stage]
    aliases: dict[str, int]

    def production_version(self) -> int | None:
        prod = [v for v, s in self.stages.items() if s == "Production"]
        return max(prod) if prod else None


class RegistryMove(_Frozen):
    """One registry operation: a stage transition or an alias change."""

    kind: Literal["stage", "set_alias", "delete_alias"]
    version: int | None = None
    stage: Stage | None = None
    alias: str | None = None
    # For a move to Production: archive whatever else is in Production in the same call, so
    # the model never has two Production versions.
    archive_existing: bool = False

    def describe(self) -> str:
        if self.kind == "stage":
            return f"version {self.version} -> {self.stage}"
        if self.kind == "set_alias":
            return f"@{self.alias} -> version {self.version}"
        return f"@{self.alias} removed"


class PromotionError(ValueError):
    """A promotion or rollback that the registry's current state does not allow."""


def plan_moves(current: RegistryState, desired: RegistryState) -> list[RegistryMove]:
    """Moves that take `current` to `desired` for the versions and aliases `desired` names.

    Order: the new Production version first (archiving the old one in the same call), then
    the other stage changes, then aliases, so `champion` never points at a non-Production
    version for longer than one call.
    """
    moves: list[RegistryMove] = []
    new_prod = desired.production_version()
    if new_prod is not None and current.stages.get(new_prod) != "Production":
        moves.append(
            RegistryMove(kind="stage", version=new_prod, stage="Production", archive_existing=True)
        )
    # What the archive_existing call above already did to the old Production versions.
    after_first = dict(current.stages)
    if moves:
        for version, stage in current.stages.items():
            if stage == "Production":
                after_first[version] = "Archived"
        after_first[new_prod] = "Production"  # type: ignore[index]
    for version, stage in sorted(desired.stages.items()):
        if version == new_prod:
            continue
        if after_first.get(version) != stage:
            moves.append(RegistryMove(kind="stage", version=version, stage=stage))
    for alias in sorted(set(current.aliases) | set(desired.aliases)):
        want = desired.aliases.get(alias)
        have = current.aliases.get(alias)
        if want is not None and want != have:
            moves.append(RegistryMove(kind="set_alias", alias=alias, version=want))
        elif want is None and have is not None and alias in ALIAS_FOR_STAGE.values():
            moves.append(RegistryMove(kind="delete_alias", alias=alias))
    return moves


def _with(
    state: RegistryState, stages: Mapping[int, Stage], aliases: Mapping[str, int | None]
) -> RegistryState:
    new_stages = {**state.stages, **stages}
    new_aliases = {**state.aliases}
    for alias, version in aliases.items():
        if version is None:
            new_aliases.pop(alias, None)
        else:
            new_aliases[alias] = version
    return RegistryState(stages=new_stages, aliases=new_aliases)


def staging_state(current: RegistryState, version: int) -> RegistryState:
    """`version` in Staging as the challenger; everything else unchanged."""
    if version not in current.stages:
        raise PromotionError(f"version {version} is not registered")
    return _with(current, {version: "Staging"}, {CHALLENGER: version})


def production_state(current: RegistryState, version: int) -> RegistryState:
    """`version` in Production as champion; the previous Production archived; no challenger."""
    if current.stages.get(version) not in ("Staging", "Production"):
        raise PromotionError(
            f"version {version} is in stage {current.stages.get(version)!r}; "
            "only a Staging version can be promoted to Production"
        )
    archived: dict[int, Stage] = {
        v: "Archived" for v, s in current.stages.items() if s == "Production" and v != version
    }
    challenger = current.aliases.get(CHALLENGER)
    return _with(
        current,
        {**archived, version: "Production"},
        {CHAMPION: version, CHALLENGER: None if challenger == version else challenger},
    )


def rollback_state(current: RegistryState, version: int) -> RegistryState:
    """An earlier `version` back in Production as champion; the current one archived."""
    if version not in current.stages:
        raise PromotionError(f"version {version} is not registered")
    if current.stages[version] == "Production":
        raise PromotionError(f"version {version} is already in Production")
    archived: dict[int, Stage] = {
        v: "Archived" for v, s in current.stages.items() if s == "Production"
    }
    return _with(current, {**archived, version: "Production"}, {CHAMPION: version})
