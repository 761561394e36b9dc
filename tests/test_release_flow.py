"""The release flow end to end: real hub client, MLflow on SQLite, Prefect, `mlflow models serve`.

One module-wide state folder; the tests run in order and build on each other, as releases do:
a first release, an unchanged re-run (caches), a release that fails validation, a release
that passes, and a rollback.
"""

from __future__ import annotations

import httpx
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from flows.release import ReleaseConfig, ReleaseValidationError, release
from flows.rollback import rollback
from flows.serve import serve
from slmops.config import GenerationSpec, RollbackConfig, ServeFlowConfig, Settings, WrapperKind
from slmops.servers import FRONT_DOOR
from slmops.store import ModelStore
from tasks.registry import read_state
from tasks.serving import ask, status_of

pytestmark = pytest.mark.e2e
KINDS = (WrapperKind.CHAT_TRANSFORMERS, WrapperKind.PROMPT_ONNX, WrapperKind.CHAT_ONNX)
SERVED = KINDS
CONFIG = ReleaseConfig()


@pytest.fixture(scope="module")
def settings(tmp_path_factory, prefect_harness, embedded_repos):
    home = tmp_path_factory.mktemp("release-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SLMOPS_HOME", str(home))
        yield Settings.from_env()
        serve(ServeFlowConfig(action="stop"))


def names() -> dict[WrapperKind, str]:
    return {kind: CONFIG.registry.model_name(kind) for kind in KINDS}


def registry_snapshot(settings: Settings) -> dict[str, object]:
    client = ModelStore.from_settings(settings).client()
    return {name: read_state(client, name) for name in names().values()}


def servers(settings: Settings) -> dict[str, object]:
    return {names()[k]: status_of(settings.servers_dir, names()[k]).handle for k in SERVED}


def task_states(flow_run_id) -> dict[str, str]:
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    return {run.name.rsplit("-", 1)[0]: run.state.name for run in runs}


def test_first_release_registers_promotes_and_serves_every_wrapper(settings):
    state = release(CONFIG, return_state=True)
    report = state.result()
    assert {o.kind for o in report.outcomes} == set(KINDS)
    for outcome in report.outcomes:
        assert outcome.validation_passed and outcome.promoted, outcome.validation_summary
        assert outcome.version == 1 and outcome.production_version == 1
    registry = registry_snapshot(settings)
    for name in names().values():
        assert registry[name].stages == {1: "Production"} and registry[name].aliases == {
            "champion": 1
        }
    for kind in SERVED:
        status = status_of(settings.servers_dir, names()[kind])
        assert status.state == "serving" and status.handle.host == "127.0.0.1"
        assert status.handle.model_uri == f"models:/{names()[kind]}/1"
        assert "Madrid" in ask(status.handle, "What is the capital of Spain?")

    # Both runtimes behind one OpenAI-compatible address.
    door = status_of(settings.servers_dir, FRONT_DOOR).handle
    for kind in (WrapperKind.CHAT_TRANSFORMERS, WrapperKind.CHAT_ONNX):
        body = {
            "model": kind.value,
            "messages": [{"role": "user", "content": "What is the capital of Spain?"}],
        }
        completion = httpx.post(f"{door.url}/v1/chat/completions", json=body, timeout=60).json()
        assert "Madrid" in completion["choices"][0]["message"]["content"]

    # What users see: the run's artifacts, through the Prefect API.
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[state.state_details.flow_run_id])
            )
        )
    by_key = {a.key: a for a in artifacts}
    assert "release-summary" in by_key and "Madrid" in by_key["release-summary"].data
    assert by_key["validation-results"].type == "table"
    # Prefect stores link artifacts as markdown links.
    endpoints = [a for key, a in by_key.items() if key.endswith("-endpoint")]
    assert len(endpoints) == len(SERVED) and all("/invocations)" in a.data for a in endpoints)
    assert any(key.endswith("-registry-moves") and a.type == "table" for key, a in by_key.items())


def test_unchanged_rerun_hits_the_caches_and_changes_nothing(settings):
    registry_before = registry_snapshot(settings)
    servers_before = servers(settings)
    state = release(CONFIG, return_state=True)
    report = state.result()
    assert all(o.version == 1 and o.production_version == 1 for o in report.outcomes)
    states = task_states(state.state_details.flow_run_id)
    for cached in (
        "fetch_snapshot",
        "log_chat_pipeline",
        "log_onnx_prompt_model",
        "log_onnx_chat_model",
    ):
        assert states[cached] == "Cached", states
    assert registry_snapshot(settings) == registry_before  # no new versions, no moves
    assert servers(settings) == servers_before  # same processes, not restarted


def test_failed_validation_leaves_production_and_the_served_models_untouched(settings):
    servers_before = servers(settings)
    # Two new tokens cannot hold the trained answers: the known-answer expectations fail.
    truncated = CONFIG.model_copy(update={"generation": GenerationSpec(max_new_tokens=2)})
    with pytest.raises(ReleaseValidationError, match="validation failed"):
        release(truncated)
    registry = registry_snapshot(settings)
    for name in names().values():
        assert registry[name].stages == {1: "Production", 2: "None"}
        assert registry[name].aliases == {"champion": 1}
        tags = ModelStore.from_settings(settings).client().get_model_version(name, "2").tags
        assert tags["slmops.validation.passed"] == "false"
    assert servers(settings) == servers_before
    for handle in servers_before.values():
        assert "Madrid" in ask(handle, "What is the capital of Spain?")


def test_a_passing_release_replaces_production_and_the_servers(settings):
    servers_before = servers(settings)
    longer = CONFIG.model_copy(update={"generation": GenerationSpec(max_new_tokens=48)})
    report = release(longer)
    assert all(o.version == 3 and o.production_version == 3 for o in report.outcomes)
    registry = registry_snapshot(settings)
    for name in names().values():
        assert registry[name].stages == {1: "Archived", 2: "None", 3: "Production"}
        assert registry[name].aliases == {"champion": 3}
    after = servers(settings)
    for name, handle in after.items():
        assert handle.model_uri == f"models:/{name}/3" and handle.pid != servers_before[name].pid
        assert status_of(settings.servers_dir, name).state == "serving"


def test_rollback_restores_and_reserves_an_earlier_version(settings):
    name = names()[WrapperKind.PROMPT_ONNX]
    report = rollback(
        RollbackConfig(kind=WrapperKind.PROMPT_ONNX, version=1, reason="test rollback")
    )
    assert report.previous_production == 3 and report.production_version == 1
    state = registry_snapshot(settings)[name]
    assert (
        state.stages[1] == "Production"
        and state.stages[3] == "Archived"
        and state.aliases == {"champion": 1}
    )
    status = status_of(settings.servers_dir, name)
    assert status.state == "serving" and status.handle.model_uri == f"models:/{name}/1"
    assert "Madrid" in ask(status.handle, "What is the capital of Spain?")
    assert any(e.reason == "test rollback" for e in report.audit)


def test_bad_rollback_target_fails_clearly_and_changes_nothing(settings):
    before = registry_snapshot(settings)
    with pytest.raises(Exception, match="not registered"):
        rollback(RollbackConfig(kind=WrapperKind.PROMPT_ONNX, version=99, reason="typo"))
    assert registry_snapshot(settings) == before
