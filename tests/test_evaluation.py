"""Evaluation of logged models on the shipped sets, through mlflow.genai.evaluate (real MLflow on
SQLite, the tiny model)."""

from __future__ import annotations

import time

import pytest
from mlflow import MlflowClient

from slmops.config import WrapperKind
from slmops.eval_sets import load_eval_set
from tasks.evaluation import evaluate_model, item_results

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
    metrics = MlflowClient(store).get_run(ref.run_id).data.metrics
    assert metrics["eval.score"] == 1.0 and metrics["exact_match/mean"] == 1.0
