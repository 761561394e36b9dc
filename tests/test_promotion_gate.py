"""The promotion gate in release runs: a first release against the floor, a degraded challenger
refused with Production and its server untouched, a forced promotion audited, and a better
challenger promoted over a weak champion whose evaluation is reused, not re-run.

One module-wide state folder; the tests build on each other, as releases do. Only the
prompt-onnx model is served (the gate does not depend on which are).
"""

from __future__ import annotations

import re

import pytest
from mlflow import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from flows.release import ReleaseConfig, ReleaseGateError, release
from flows.serve import serve
from slmops import tags
from slmops.config import GenerationSpec, ServeFlowConfig, ServeSpec, Settings, ValidationSpec
from slmops.config import WrapperKind as Kind
from slmops.store import ModelStore
from tasks.registry import audit_trail, read_state
from tasks.serving import ask, status_of

pytestmark = pytest.mark.e2e
CONFIG = ReleaseConfig(serve=ServeSpec(kinds=(Kind.PROMPT_ONNX,), front_door=False))
# Four new tokens cut every trained answer short ("The capital of Spain") but keep the structure
# that validation checks for a real model (no reference answers): greedy, so deterministic, and a
# challenger only the gate can catch.
DEGRADED = CONFIG.model_copy(
    update={
        "generation": GenerationSpec(max_new_tokens=4),
        "validation": ValidationSpec(reference_answers=False),
    }
)
NAMES = {kind: CONFIG.registry.model_name(kind) for kind in Kind}
SERVED = NAMES[Kind.PROMPT_ONNX]


@pytest.fixture(scope="module")
def settings(tmp_path_factory, prefect_harness, embedded_repos):
    home = tmp_path_factory.mktemp("gate-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SLMOPS_HOME", str(home))
        yield Settings.from_env()
        serve(ServeFlowConfig(action="stop", serve=CONFIG.serve))


def client(settings: Settings) -> MlflowClient:
    return ModelStore.from_settings(settings).client()


def registry(settings: Settings) -> dict[str, object]:
    return {name: read_state(client(settings), name) for name in NAMES.values()}


def version_tags(settings: Settings, name: str, version: int) -> dict[str, str]:
    return client(settings).get_model_version(name, str(version)).tags


def test_a_first_release_is_judged_against_the_floor_alone(settings):
    report = release(CONFIG)
    for outcome in report.outcomes:
        assert outcome.promoted and outcome.gate == "passed", outcome.gate_summary
        assert "no champion (floor only)" in outcome.gate_summary
        found = version_tags(settings, outcome.registered_model, 1)
        assert found[tags.GATE] == "passed"
        assert found[f"{tags.GATE}.score_floor"] == "score_floor: 1, needs >= 0.9: ok"
        assert found[f"{tags.GATE}.score_vs_champion"].endswith("not checked (no champion)")
        run = client(settings).get_run(
            client(settings).get_model_version(outcome.registered_model, "1").run_id
        )
        assert run.data.metrics["gate.score_floor.value"] == 1.0
        assert run.data.metrics["gate.score_floor.threshold"] == 0.9
        assert run.data.metrics["gate.score_floor.passed"] == 1.0
        assert run.data.metrics["eval.score"] == 1.0  # and MLflow's own per-scorer mean:
        assert run.data.metrics["exact_match/mean"] == 1.0
        if outcome.kind is not Kind.CHAT_TRANSFORMERS:  # both runtimes learned the same answers
            assert run.data.metrics["eval.agreement_with_transformers"] == 1.0
    assert status_of(settings.servers_dir, SERVED).handle.model_uri == f"models:/{SERVED}/1"


def test_a_degraded_challenger_is_refused_and_production_stays(settings):
    server_before = status_of(settings.servers_dir, SERVED).handle
    state = release(DEGRADED, return_state=True)
    assert state.is_failed()
    with pytest.raises(ReleaseGateError) as refused:
        state.result()
    message = str(refused.value)
    for name in NAMES.values():
        assert f"promotion gate refused {name} v2 (Production stays v1)" in message
    # The metric and the numbers: the challenger's score against the floor and the champion's.
    assert re.search(r"score_floor: 0(\.\d+)?, needs >= 0\.9: FAILED", message), message
    assert re.search(
        r"score_vs_champion: 0(\.\d+)?, needs >= 0\.98 \(champion 1\): FAILED", message
    )

    for name, state_now in registry(settings).items():
        assert state_now.stages == {1: "Production", 2: "None"}
        assert state_now.aliases == {"champion": 1}
        found = version_tags(settings, name, 2)
        assert found[tags.VALIDATION_PASSED] == "true"  # validation could not tell
        assert found[tags.GATE] == "failed" and "FAILED" in found[tags.GATE_SUMMARY]
    server_after = status_of(settings.servers_dir, SERVED)
    assert server_after.handle == server_before and server_after.state == "serving"
    assert "Madrid" in ask(server_after.handle, "What is the capital of Spain?")

    with get_client(sync_client=True) as prefect:
        artifacts = prefect.read_artifacts(
            flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[state.state_details.flow_run_id])
            )
        )
    by_key = {a.key: a for a in artifacts}
    changed = by_key[f"{SERVED}-changed-answers"]
    assert changed.type == "table" and "Madrid" in str(changed.data)
    assert by_key[f"{SERVED}-gate"].type == "table"


def test_a_forced_promotion_is_audited(settings):
    forced = DEGRADED.model_copy(
        update={"promote": "force", "promote_reason": "ops: accept v2 for the demo"}
    )
    report = release(forced)
    for outcome in report.outcomes:
        assert outcome.version == 2 and outcome.promoted and outcome.gate == "forced"
        found = version_tags(settings, outcome.registered_model, 2)
        assert found[tags.GATE] == "forced"
        assert found[tags.GATE_OVERRIDE] == "ops: accept v2 for the demo"
        moves = [
            e
            for e in audit_trail(ModelStore.from_settings(settings), outcome.registered_model)
            if e.version == 2
        ]
        assert moves and all("FORCED past the promotion gate" in e.reason for e in moves)
        assert all("score_floor" in e.reason and "ops: accept v2" in e.reason for e in moves)
    for state_now in registry(settings).values():
        assert state_now.aliases == {"champion": 2}
    assert status_of(settings.servers_dir, SERVED).handle.model_uri == f"models:/{SERVED}/2"


def test_a_better_challenger_is_promoted_over_a_weak_champion_evaluated_once(settings):
    runs_of_v2 = {
        name: client(settings).get_model_version(name, "2").run_id for name in NAMES.values()
    }
    history_before = {
        name: len(client(settings).get_metric_history(run, "eval.score"))
        for name, run in runs_of_v2.items()
    }
    better = CONFIG.model_copy(update={"generation": GenerationSpec(max_new_tokens=48)})
    report = release(better)
    for outcome in report.outcomes:
        assert outcome.version == 3 and outcome.promoted and outcome.gate == "passed"
        assert "gate passed against champion v2" in outcome.gate_summary
    for name, run in runs_of_v2.items():
        # The champion's evaluation came from its version's tag: no new evaluation of v2.
        assert len(client(settings).get_metric_history(run, "eval.score")) == history_before[name]
        assert registry(settings)[name].aliases == {"champion": 3}
