"""Promotion planning (pure): the moves between registry states."""

from __future__ import annotations

import pytest

from slmops.promotion import (
    CHALLENGER,
    CHAMPION,
    PromotionError,
    RegistryState,
    plan_moves,
    production_state,
    rollback_state,
    staging_state,
)

pytestmark = pytest.mark.unit


def _apply(state: RegistryState, moves) -> RegistryState:
    """What MLflow does with the moves (archive_existing included)."""
    stages = dict(state.stages)
    aliases = dict(state.aliases)
    for move in moves:
        if move.kind == "stage":
            if move.archive_existing:
                stages = {v: ("Archived" if s == "Production" else s) for v, s in stages.items()}
            stages[move.version] = move.stage
        elif move.kind == "set_alias":
            aliases[move.alias] = move.version
        else:
            aliases.pop(move.alias)
    return RegistryState(stages=stages, aliases=aliases)


def test_first_promotion_goes_through_staging_to_production():
    state = RegistryState(stages={1: "None"}, aliases={})
    staged = _apply(state, plan_moves(state, staging_state(state, 1)))
    assert staged.stages == {1: "Staging"} and staged.aliases == {CHALLENGER: 1}
    prod = _apply(staged, plan_moves(staged, production_state(staged, 1)))
    assert prod.stages == {1: "Production"} and prod.aliases == {CHAMPION: 1}


def test_promotion_archives_previous_production_first():
    state = RegistryState(
        stages={1: "Production", 2: "Staging"}, aliases={CHAMPION: 1, CHALLENGER: 2}
    )
    moves = plan_moves(state, production_state(state, 2))
    assert moves[0].kind == "stage" and moves[0].version == 2 and moves[0].archive_existing
    after = _apply(state, moves)
    assert after.stages == {1: "Archived", 2: "Production"}
    assert after.aliases == {CHAMPION: 2}
    assert [v for v, s in after.stages.items() if s == "Production"] == [2]


def test_only_a_staging_version_reaches_production():
    state = RegistryState(stages={1: "None"}, aliases={})
    with pytest.raises(PromotionError, match="only a Staging version"):
        production_state(state, 1)


def test_unknown_version_is_refused():
    state = RegistryState(stages={1: "Production"}, aliases={CHAMPION: 1})
    with pytest.raises(PromotionError, match="not registered"):
        staging_state(state, 7)
    with pytest.raises(PromotionError, match="not registered"):
        rollback_state(state, 7)


def test_rollback_restores_an_archived_version():
    state = RegistryState(stages={1: "Archived", 2: "Production"}, aliases={CHAMPION: 2})
    after = _apply(state, plan_moves(state, rollback_state(state, 1)))
    assert after.stages == {1: "Production", 2: "Archived"} and after.aliases == {CHAMPION: 1}


def test_compensation_plan_restores_the_state_before():
    before = RegistryState(
        stages={1: "Production", 2: "Staging"}, aliases={CHAMPION: 1, CHALLENGER: 2}
    )
    # A promotion that stopped after its first move: 2 in Production, champion still on 1.
    partial = RegistryState(
        stages={1: "Archived", 2: "Production"}, aliases={CHAMPION: 1, CHALLENGER: 2}
    )
    restored = _apply(partial, plan_moves(partial, before))
    assert restored == before


def test_no_moves_when_already_there():
    state = RegistryState(stages={1: "Production"}, aliases={CHAMPION: 1})
    assert plan_moves(state, state) == []
