"""Registry tasks on a real MLflow SQLite store: register, promote, compensate, roll back, audit."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient
from prefect.logging import disable_run_logger

from slmops.store import ModelStore
from tasks.registry import (
    ModelVersionRef,
    audit_trail,
    promote_version,
    read_state,
    register_version,
    rollback_version,
)
from tests.support.echo_versions import log_echo_model, register

pytestmark = pytest.mark.integration


def promote(store: ModelStore, ref: ModelVersionRef, tmp_path: Path):
    with disable_run_logger():
        return promote_version.fn(store, ref, "test", tmp_path / "locks")


def test_register_is_idempotent_for_the_same_logged_model(fresh_store):
    uri = log_echo_model(fresh_store)
    with disable_run_logger():
        first = register_version.fn(fresh_store, uri, "m", {})
        again = register_version.fn(fresh_store, uri, "m", {})
    assert first == again == ModelVersionRef(name="m", version=1)


def test_promotion_moves_stages_and_aliases_and_archives_the_old(fresh_store, tmp_path):
    client = fresh_store.client()
    v1 = register(fresh_store, "m")
    report1 = promote(fresh_store, v1, tmp_path)
    assert report1.previous_production is None
    v2 = register(fresh_store, "m")
    report2 = promote(fresh_store, v2, tmp_path)
    assert report2.previous_production == 1
    state = read_state(client, "m")
    assert state.stages == {1: "Archived", 2: "Production"}
    assert state.aliases == {"champion": 2}
    assert str(client.get_model_version_by_alias("m", "champion").version) == "2"
    moves = [e.move for e in audit_trail(fresh_store, "m")]
    assert "version 2 -> Staging" in moves and "@challenger -> version 2" in moves
    assert "version 2 -> Production" in moves and "@champion -> version 2" in moves
    assert all(e.by and e.reason == "test" for e in audit_trail(fresh_store, "m"))


def test_unvalidated_version_is_never_promoted(fresh_store, tmp_path):
    v1 = register(fresh_store, "m")
    promote(fresh_store, v1, tmp_path)
    bad = register(fresh_store, "m", passed=False)
    with pytest.raises(ValueError, match="has not passed validation"):
        promote(fresh_store, bad, tmp_path)
    state = read_state(fresh_store.client(), "m")
    assert state.stages == {1: "Production", 2: "None"} and state.aliases == {"champion": 1}


def test_failure_mid_promotion_leaves_previous_production(fresh_store, tmp_path, monkeypatch):
    v1 = register(fresh_store, "m")
    promote(fresh_store, v1, tmp_path)
    v2 = register(fresh_store, "m")
    real_set_alias = MlflowClient.set_registered_model_alias

    def fail_on_champion(self, name, alias, version):
        if alias == "champion":
            raise RuntimeError("registry went away")
        return real_set_alias(self, name, alias, version)

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", fail_on_champion)
    with pytest.raises(RuntimeError, match="registry went away"):
        promote(fresh_store, v2, tmp_path)
    monkeypatch.undo()
    state = read_state(fresh_store.client(), "m")
    assert state.production_version() == 1
    assert state.aliases["champion"] == 1
    assert [v for v, s in state.stages.items() if s == "Production"] == [1]
    assert any(e.reason.startswith("compensation") for e in audit_trail(fresh_store, "m"))


def test_rollback_to_an_earlier_version(fresh_store, tmp_path):
    v1 = register(fresh_store, "m")
    promote(fresh_store, v1, tmp_path)
    v2 = register(fresh_store, "m")
    promote(fresh_store, v2, tmp_path)
    with disable_run_logger():
        report = rollback_version.fn(fresh_store, v1, "bad answers", tmp_path / "locks")
    assert report.previous_production == 2 and report.production_version == 1
    state = read_state(fresh_store.client(), "m")
    assert state.stages == {1: "Production", 2: "Archived"} and state.aliases == {"champion": 1}


def test_promoting_the_champion_again_moves_nothing(fresh_store, tmp_path):
    v1 = register(fresh_store, "m")
    promote(fresh_store, v1, tmp_path)
    moves_before = len(audit_trail(fresh_store, "m"))
    report = promote(fresh_store, v1, tmp_path)
    assert report.audit == () and report.previous_production == 1
    assert len(audit_trail(fresh_store, "m")) == moves_before


def test_a_registered_model_takes_versions_of_one_source_repo_only(fresh_store):
    from tasks.registry import SOURCE_REPO_TAG, RegistryConflictError

    real = {SOURCE_REPO_TAG: "microsoft/Phi-3-mini-4k-instruct"}
    with disable_run_logger():
        first = register_version.fn(fresh_store, log_echo_model(fresh_store), "m", real)
        tiny_uri = log_echo_model(fresh_store)
        with pytest.raises(RegistryConflictError, match="holds releases of microsoft/Phi-3"):
            register_version.fn(fresh_store, tiny_uri, "m", {SOURCE_REPO_TAG: "slmops/tiny-phi3"})
    client = fresh_store.client()
    assert [int(v.version) for v in client.search_model_versions("name='m'")] == [first.version]
    assert client.get_registered_model("m").tags[SOURCE_REPO_TAG] == real[SOURCE_REPO_TAG]
