"""Evaluation of logged models on the shipped sets, through mlflow.genai.evaluate (real MLflow on
SQLite, the tiny model)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from prefect import flow

from flows.release import WrapperStep, release_wrapper
from offline_kit.tiny_model import degrade_weights
from slmops import tags
from slmops.config import (
    GenerationSpec,
    RegistrySpec,
    ReleaseConfig,
    ServeSpec,
    Settings,
    ValidationSpec,
    WrapperKind,
)
from slmops.eval_sets import load_eval_set
from slmops.expectations import known_answer_prompts
from slmops.refs import LoggedModelRef, ModelVersionRef, SnapshotRef
from tasks.evaluation import evaluate_champion, evaluate_model, item_results, recorded_evaluation
from tasks.mlflow_models import log_chat_pipeline
from tasks.registry import read_state
from tasks.validation import (
    is_loaded,
    load_model,
    local_model_dir,
    unload_model,
    validate_outputs,
)

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("kind", list(WrapperKind))
def test_the_tiny_model_passes_its_own_set(store, logged, kind):
    ref = logged[kind]
    eval_set = load_eval_set("tiny-phi3")
    started = time.perf_counter()
    evaluation = evaluate_model.fn(store, ref, eval_set)
    print(f"{kind}: evaluated in {time.perf_counter() - started:.1f} s")
    results = item_results(store, evaluation)
    assert [r.id for r in results] == [i.id for i in eval_set.items]
    assert evaluation.score == 1.0, [r for r in results if not r.passed]
    assert evaluation.latency_p95_s > 0 and evaluation.peak_rss_mb is None
    metrics = store.client().get_run(ref.run_id).data.metrics
    assert metrics["eval.score"] == 1.0 and metrics["exact_match/mean"] == 1.0


def test_a_wrong_answer_fails_its_item_through_mlflow(store, logged, tmp_path):
    # The set with one reference answer perturbed: the model's (right) answer must now fail.
    lines = load_eval_set("tiny-phi3").model_dump()["items"]
    lines[0]["check"]["answer"] = "The capital of Spain is Barcelona."
    path = tmp_path / "perturbed.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    ref = logged[WrapperKind.PROMPT_ONNX]
    evaluation = evaluate_model.fn(store, ref, load_eval_set(str(path)))
    assert (evaluation.passed, evaluation.items) == (7, 8)
    failed = [r for r in item_results(store, evaluation) if not r.passed]
    assert [r.id for r in failed] == [lines[0]["id"]]
    assert failed[0].answer == "The capital of Spain is Madrid."
    assert "Barcelona" in failed[0].rationale and failed[0].scorer == "exact_match"


def test_the_evaluation_asks_the_model_validation_loaded_and_reuses_its_answers(
    store, logged, monkeypatch
):
    ref, eval_set = logged[WrapperKind.PROMPT_ONNX], load_eval_set("tiny-phi3")
    # A release of the tiny model validates with its set's known answers, then evaluates.
    validated = validate_outputs.fn(store, ref, known_answers=known_answer_prompts(eval_set))
    assert validated.passed, validated.failures
    model = load_model(local_model_dir(store, ref))
    monkeypatch.setattr(model, "predict", lambda *args, **kwargs: pytest.fail("asked again"))
    evaluation = evaluate_model.fn(store, ref, eval_set)
    assert evaluation.score == 1.0 and evaluation.latency_p95_s > 0
    unload_model()
    assert not is_loaded(local_model_dir(store, ref))
    # The warm-up the evaluation skips on a local store is still where MLflow calls it.
    from mlflow.genai.evaluation import harness

    assert callable(harness._warmup_databricks_sdk)


def test_memory_is_measured_in_a_fresh_process(store, logged):
    ref = logged[WrapperKind.PROMPT_ONNX]
    evaluation = evaluate_model.fn(store, ref, load_eval_set("tiny-phi3"), measure_memory=True)
    assert evaluation.score == 1.0
    # The peak of a Python process with MLflow and onnxruntime-genai loaded.
    assert evaluation.peak_rss_mb is not None and 100 < evaluation.peak_rss_mb < 4000
    metrics = store.client().get_run(ref.run_id).data.metrics
    assert metrics["eval.peak_rss_mb"] == evaluation.peak_rss_mb


def test_a_champion_without_a_recorded_evaluation_is_evaluated_once(store, logged):
    # A champion promoted before the gate existed: evaluated on first need, then reused.
    ref = logged[WrapperKind.CHAT_ONNX]
    name = "gate-test-chat-onnx"
    client = store.client()
    client.create_registered_model(name)
    with store.activated():
        client.create_model_version(
            name, source=ref.model_uri, run_id=ref.run_id, model_id=ref.model_id
        )
    champion, eval_set = ModelVersionRef(name=name, version=1), load_eval_set("tiny-phi3")
    assert recorded_evaluation(store, champion, eval_set) is None
    first = evaluate_champion.fn(store, champion, ref.kind, eval_set)
    assert first.score == 1.0 and recorded_evaluation(store, champion, eval_set) == first
    evaluations = len(client.get_metric_history(ref.run_id, "eval.score"))
    assert evaluate_champion.fn(store, champion, ref.kind, eval_set) == first
    assert len(client.get_metric_history(ref.run_id, "eval.score")) == evaluations
    # Another set (or the same name with other content) is another evaluation.
    other = eval_set.model_copy(update={"digest": "0" * 64})
    assert recorded_evaluation(store, champion, other) is None


def test_a_challenger_with_perturbed_weights_is_refused_and_production_stays(
    prefect_harness, store, logged, tiny_model_dir, tmp_path
):
    # The tiny model with noise in every decoder layer still answers in fluent sentences, so a
    # structure-only validation passes it; only the evaluation sees it answer the set wrongly.
    degraded_dir = degrade_weights(
        tiny_model_dir, tmp_path / "degraded", scale=1.0, match="layers."
    )
    source = {"repo": "slmops/tiny-phi3", "commit": "degraded"}
    degraded = log_chat_pipeline.fn(
        store, "release", degraded_dir, GenerationSpec(max_new_tokens=32), source
    )
    config = ReleaseConfig(
        validation=ValidationSpec(reference_answers=False),
        registry=RegistrySpec(name_prefix="perturbed-test"),
        serve=ServeSpec(enabled=False),
    )
    settings = Settings(slmops_home=tmp_path / "home", mlflow_tracking_uri=store.tracking_uri)
    champion_ref = logged[WrapperKind.CHAT_TRANSFORMERS]

    @flow
    def release_both() -> tuple[WrapperStep, WrapperStep]:
        # What the release flow does for each wrapper: validate, register, gate, promote.
        eval_set = load_eval_set(config.evaluation.eval_set)
        steps = [
            release_wrapper(config, settings, _snapshot(ref), ref, None, eval_set, ())
            for ref in (champion_ref, degraded)
        ]
        return steps[0], steps[1]

    first, second = release_both()
    assert first.outcome.promoted and first.outcome.production_version == 1
    assert second.outcome.validation_passed  # structure only: validation cannot tell
    assert not second.outcome.promoted and second.outcome.gate == "failed"
    assert second.outcome.production_version == 1
    assert second.evaluation is not None and second.evaluation.score < 0.9
    summary = second.outcome.gate_summary
    assert summary.startswith("gate failed against champion v1"), summary
    assert re.search(r"score_floor: 0(\.\d+)?, needs >= 0\.9: FAILED", summary), summary
    assert re.search(r"score_vs_champion: 0(\.\d+)?, needs >= 0\.98 \(champion 1\)", summary)

    name = config.registry.model_name(WrapperKind.CHAT_TRANSFORMERS)
    state = read_state(store.client(), name)
    assert state.stages == {1: "Production", 2: "None"} and state.aliases == {"champion": 1}
    version = store.client().get_model_version(name, "2")
    assert version.tags[tags.GATE] == "failed" and "score_floor" in version.tags[tags.GATE_SUMMARY]
    assert not settings.servers_dir.exists()  # nothing was served, started or stopped


def _snapshot(ref: LoggedModelRef) -> SnapshotRef:
    return SnapshotRef(
        repo_id="slmops/tiny-phi3", revision="main", commit=ref.run_id[:8].ljust(40, "0"),
        path=Path("/nonexistent"), files=(),
    )  # fmt: skip
