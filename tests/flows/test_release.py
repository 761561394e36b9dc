"""The release flow end to end: real hub client, MLflow on SQLite, Prefect, `mlflow models serve`.

One module-wide state folder; the tests run in order and build on each other, as releases do:
- a first release, judged by the promotion gate against its floor alone;
- an unchanged re-run (caches);
- a release that fails validation;
- a degraded challenger that passes validation but is refused by the gate, Production and the
  servers untouched;
- that challenger promoted by force, audited as such;
- a better challenger promoted over the weak champion (whose evaluation is reused, not re-run),
  replacing Production and every server;
- a rollback, a rollback to a version that does not exist, and one whose server cannot fit.
"""

from __future__ import annotations

import re

import httpx
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from flows.release import ReleaseConfig, ReleaseGateError, ReleaseValidationError, release
from flows.rollback import RollbackMemoryError, rollback
from flows.serve import serve
from slmops import tags
from slmops.config import (
    GateSpec,
    GenerationSpec,
    RollbackConfig,
    ServeFlowConfig,
    Settings,
    ValidationSpec,
    WrapperKind,
)
from slmops.servers import FRONT_DOOR
from slmops.store import ModelStore
from tasks.registry import audit_trail, read_state
from tasks.serving import ask, status_of

pytestmark = pytest.mark.e2e
KINDS = (WrapperKind.CHAT_TRANSFORMERS, WrapperKind.PROMPT_ONNX, WrapperKind.CHAT_ONNX)
SERVED = KINDS
# Latency is judged on a shared test machine, where the champion and the challenger are timed
# under different loads: a generous slack keeps these releases about scores (the latency and
# memory rules are unit-tested in tests/slmops/test_gate.py).
CONFIG = ReleaseConfig(gate=GateSpec(latency_slack_s=10.0))
# Four new tokens cut every trained answer short ("The capital of Spain") but keep the structure
# that validation checks for a real model (no reference answers): greedy, so deterministic, and a
# challenger only the gate can catch.
DEGRADED = CONFIG.model_copy(
    update={
        "generation": GenerationSpec(max_new_tokens=4),
        "validation": ValidationSpec(reference_answers=False),
    }
)
SPAIN = "What is the capital of Spain?"


@pytest.fixture(scope="module")
def settings(tmp_path_factory, prefect_harness, embedded_repos):
    home = tmp_path_factory.mktemp("release-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SLMOPS_HOME", str(home))
        yield Settings.from_env()
        serve(ServeFlowConfig(action="stop"))


def names() -> dict[WrapperKind, str]:
    return {kind: CONFIG.registry.model_name(kind) for kind in KINDS}


def store(settings: Settings) -> ModelStore:
    return ModelStore.from_settings(settings)


def registry_snapshot(settings: Settings) -> dict[str, object]:
    client = store(settings).client()
    return {name: read_state(client, name) for name in names().values()}


def version_tags(settings: Settings, name: str, version: int) -> dict[str, str]:
    return store(settings).client().get_model_version(name, str(version)).tags


def servers(settings: Settings) -> dict[str, object]:
    return {names()[k]: status_of(settings.servers_dir, names()[k]).handle for k in SERVED}


def artifacts_of(flow_run_id) -> dict[str, object]:
    """The run's Prefect artifacts by key, as users see them through the Prefect API."""
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    return {a.key: a for a in found}


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
        assert "Madrid" in ask(status.handle, SPAIN)

    # Both runtimes behind one OpenAI-compatible address.
    door = status_of(settings.servers_dir, FRONT_DOOR).handle
    for kind in (WrapperKind.CHAT_TRANSFORMERS, WrapperKind.CHAT_ONNX):
        body = {"model": kind.value, "messages": [{"role": "user", "content": SPAIN}]}
        completion = httpx.post(f"{door.url}/v1/chat/completions", json=body, timeout=60).json()
        assert "Madrid" in completion["choices"][0]["message"]["content"]

    by_key = artifacts_of(state.state_details.flow_run_id)
    assert "release-summary" in by_key and "Madrid" in by_key["release-summary"].data
    assert by_key["validation-results"].type == "table"
    # Prefect stores link artifacts as markdown links.
    endpoints = [a for key, a in by_key.items() if key.endswith("-endpoint")]
    assert len(endpoints) == len(SERVED) and all("/invocations)" in a.data for a in endpoints)
    assert any(key.endswith("-registry-moves") and a.type == "table" for key, a in by_key.items())


def test_a_first_release_is_judged_against_the_floor_alone(settings):
    client = store(settings).client()
    for name in names().values():
        found = version_tags(settings, name, 1)
        assert found[tags.GATE] == "passed", found
        assert "no champion (floor only)" in found[tags.GATE_SUMMARY]
        assert found[f"{tags.GATE}.score_floor"] == "score_floor: 1, needs >= 0.9: ok"
        assert found[f"{tags.GATE}.score_vs_champion"].endswith("not checked (no champion)")
        run = client.get_run(client.get_model_version(name, "1").run_id)
        assert run.data.metrics["gate.score_floor.value"] == 1.0
        assert run.data.metrics["gate.score_floor.threshold"] == 0.9
        assert run.data.metrics["gate.score_floor.passed"] == 1.0
        assert run.data.metrics["eval.score"] == 1.0  # and MLflow's own per-scorer mean:
        assert run.data.metrics["exact_match/mean"] == 1.0
        if name != names()[WrapperKind.CHAT_TRANSFORMERS]:  # both runtimes learned the answers
            assert run.data.metrics["eval.agreement_with_transformers"] == 1.0


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
        assert version_tags(settings, name, 2)[tags.VALIDATION_PASSED] == "false"
    assert servers(settings) == servers_before
    for handle in servers_before.values():
        assert "Madrid" in ask(handle, SPAIN)


def test_a_degraded_challenger_is_refused_by_the_gate_and_production_stays(settings):
    servers_before = servers(settings)
    state = release(DEGRADED, return_state=True)
    assert state.is_failed()
    with pytest.raises(ReleaseGateError) as refused:
        state.result()
    message = str(refused.value)
    for name in names().values():
        assert f"promotion gate refused {name} v3 (Production stays v1)" in message
    # The metric and the numbers: the challenger's score against the floor and the champion's.
    assert re.search(r"score_floor: 0(\.\d+)?, needs >= 0\.9: FAILED", message), message
    assert re.search(
        r"score_vs_champion: 0(\.\d+)?, needs >= 0\.98 \(champion 1\): FAILED", message
    )

    for name, state_now in registry_snapshot(settings).items():
        assert state_now.stages == {1: "Production", 2: "None", 3: "None"}
        assert state_now.aliases == {"champion": 1}
        found = version_tags(settings, name, 3)
        assert found[tags.VALIDATION_PASSED] == "true"  # validation could not tell
        assert found[tags.GATE] == "failed" and "FAILED" in found[tags.GATE_SUMMARY]
    assert servers(settings) == servers_before
    for name, handle in servers_before.items():
        assert status_of(settings.servers_dir, name).state == "serving"
        assert "Madrid" in ask(handle, SPAIN)

    by_key = artifacts_of(state.state_details.flow_run_id)
    served = names()[WrapperKind.PROMPT_ONNX]
    changed = by_key[f"{served}-changed-answers"]
    assert changed.type == "table" and "Madrid" in str(changed.data)
    assert by_key[f"{served}-gate"].type == "table"


def test_a_forced_promotion_is_audited(settings):
    forced = DEGRADED.model_copy(
        update={"promote": "force", "promote_reason": "ops: accept v3 for the demo"}
    )
    report = release(forced)
    for outcome in report.outcomes:
        assert outcome.version == 3 and outcome.promoted and outcome.gate == "forced"
        found = version_tags(settings, outcome.registered_model, 3)
        assert found[tags.GATE] == "forced"
        assert found[tags.GATE_OVERRIDE] == "ops: accept v3 for the demo"
        moves = [
            e for e in audit_trail(store(settings), outcome.registered_model) if e.version == 3
        ]
        assert moves and all("FORCED past the promotion gate" in e.reason for e in moves)
        assert all("score_floor" in e.reason and "ops: accept v3" in e.reason for e in moves)
    for name, state_now in registry_snapshot(settings).items():
        assert state_now.aliases == {"champion": 3}
        assert status_of(settings.servers_dir, name).handle.model_uri == f"models:/{name}/3"


def test_a_better_challenger_replaces_the_weak_champion_and_its_servers(settings):
    servers_before = servers(settings)
    client = store(settings).client()
    runs_of_v3 = {name: client.get_model_version(name, "3").run_id for name in names().values()}
    history_before = {
        name: len(client.get_metric_history(run, "eval.score")) for name, run in runs_of_v3.items()
    }
    better = CONFIG.model_copy(update={"generation": GenerationSpec(max_new_tokens=48)})
    report = release(better)
    for outcome in report.outcomes:
        assert outcome.version == 4 and outcome.production_version == 4 and outcome.promoted
        assert outcome.gate == "passed" and "gate passed against champion v3" in (
            outcome.gate_summary
        )
    registry = registry_snapshot(settings)
    for name, run in runs_of_v3.items():
        assert registry[name].stages == {1: "Archived", 2: "None", 3: "Archived", 4: "Production"}
        assert registry[name].aliases == {"champion": 4}
        # The champion's evaluation came from its version's tag: no new evaluation of v3.
        assert len(client.get_metric_history(run, "eval.score")) == history_before[name]
    after = servers(settings)
    for name, handle in after.items():
        assert handle.model_uri == f"models:/{name}/4" and handle.pid != servers_before[name].pid
        assert status_of(settings.servers_dir, name).state == "serving"
        assert "Madrid" in ask(handle, SPAIN)


def test_rollback_restores_and_reserves_an_earlier_version(settings):
    name = names()[WrapperKind.PROMPT_ONNX]
    report = rollback(
        RollbackConfig(kind=WrapperKind.PROMPT_ONNX, version=1, reason="test rollback")
    )
    assert report.previous_production == 4 and report.production_version == 1
    state = registry_snapshot(settings)[name]
    assert (
        state.stages[1] == "Production"
        and state.stages[4] == "Archived"
        and state.aliases == {"champion": 1}
    )
    status = status_of(settings.servers_dir, name)
    assert status.state == "serving" and status.handle.model_uri == f"models:/{name}/1"
    assert "Madrid" in ask(status.handle, SPAIN)
    assert any(e.reason == "test rollback" for e in report.audit)


def test_bad_rollback_target_fails_clearly_and_changes_nothing(settings):
    before = registry_snapshot(settings)
    with pytest.raises(Exception, match="not registered"):
        rollback(RollbackConfig(kind=WrapperKind.PROMPT_ONNX, version=99, reason="typo"))
    assert registry_snapshot(settings) == before


def test_a_rollback_whose_server_cannot_fit_changes_nothing(settings):
    name = names()[WrapperKind.PROMPT_ONNX]
    before = registry_snapshot(settings)
    served = status_of(settings.servers_dir, name).handle
    no_room = RollbackConfig(kind=WrapperKind.PROMPT_ONNX, version=4, reason="no room")
    no_room = no_room.model_copy(
        update={"serve": no_room.serve.model_copy(update={"memory_budget_gb": 0.01})}
    )
    with pytest.raises(RollbackMemoryError, match=r"back to v4.*Production stays v1, still served"):
        rollback(no_room)
    # Refused before the registry moved: Production still names the version being served.
    assert registry_snapshot(settings) == before
    status = status_of(settings.servers_dir, name)
    assert status.state == "serving" and status.handle.model_uri == served.model_uri
