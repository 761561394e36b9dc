"""Evaluate logged models on an evaluation set through MLflow's GenAI evaluation, and record the
promotion gate's decision.

`evaluate_model` predicts the set's items with the logged model (in this process, or in a fresh
one that reports its peak RSS), scores the answers with code scorers (`slmops.scorers`) through
`mlflow.genai.evaluate` on the model's own run and LoggedModel, so each item shows in the MLflow
UI as a trace with its assessments, and returns a small `Evaluation`. The per-item results are
an artifact of the run; the summary is also kept on the registered version
(`slmops.evaluation.<set>`), so a champion is evaluated once per version and set, not on every
release. `record_gate_decision` writes the decision on the version (tags) and the run (metrics
and tags).

Run as `python -m tasks.evaluation <model dir> <kind> <items.json> <out.json>`, it is the fresh
process that predicts and reports its peak RSS.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import INPUTS, TASK_SOURCE
from prefect.exceptions import MissingContextError
from pydantic import BaseModel, ConfigDict, TypeAdapter

from slmops import eval_sets, gate, scorers, tags
from slmops.config import WrapperKind
from slmops.eval_sets import EvalItem, EvalSet
from slmops.gate import Evaluation, GateDecision, ItemResult, summarize
from slmops.processes import own_peak_rss_mb
from slmops.refs import LoggedModelRef, ModelVersionRef
from slmops.scorers import SCORER_OF, SCORERS, Check, score
from slmops.store import ModelStore
from tasks.caching import WhileResultIsLive, logged_model_exists, source_of
from tasks.validation import ask_model, is_loaded, load_model, local_model_dir

CHECK = TypeAdapter(Check)

# An evaluation depends on the scorers, the set's parsing and the summary, not only on the
# task's lines (the set's content is an input); and is reused only while its model exists.
EVALUATION_CACHE_POLICY = WhileResultIsLive(
    base=INPUTS + TASK_SOURCE + source_of(sys.modules[__name__], scorers, eval_sets, gate),
    is_live=lambda result, inputs: logged_model_exists(
        inputs["store"], inputs["model_ref"].model_id
    ),
)


def _log() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    try:
        return get_run_logger()
    except MissingContextError:  # called via .fn outside a flow
        return logging.getLogger(__name__)


class Prediction(BaseModel):
    """One item's answer as the model gave it, and how long it took."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    answer: str | None
    latency_s: float
    error: str | None = None


def answer_text(kind: WrapperKind, output: Any) -> str | None:
    """The text of one prediction: the string of the prompt wrapper, a chat completion's content."""
    if isinstance(output, list | tuple):
        output = output[0] if len(output) == 1 else None
    if kind is WrapperKind.PROMPT_ONNX:
        return output if isinstance(output, str) else None
    with contextlib.suppress(KeyError, IndexError, TypeError):
        content = output["choices"][0]["message"]["content"]
        return content if isinstance(content, str) else None
    return None


def predict_items(folder: Path, kind: WrapperKind, items: Sequence[EvalItem]) -> list[Prediction]:
    """Each item's answer from the model in `folder`, timed one request at a time (the model
    validation just loaded and asked, whose answers to the same requests are reused)."""
    if not is_loaded(folder):
        # One untimed request first: lazy initialisation is not the model's latency.
        with contextlib.suppress(Exception):
            load_model(folder).predict(items[0].request(kind))
    predictions = []
    for item in items:
        started = time.perf_counter()
        try:
            (output, latency), error = ask_model(folder, item.request(kind)), None
        except Exception as failure:  # an item the model cannot answer fails, it is not a crash
            output, error = None, f"{type(failure).__name__}: {failure}"[:500]
            latency = time.perf_counter() - started
        predictions.append(
            Prediction(id=item.id, answer=answer_text(kind, output), latency_s=latency, error=error)
        )
    return predictions


def _predict_in_fresh_process(
    folder: Path, kind: WrapperKind, items: Sequence[EvalItem]
) -> tuple[list[Prediction], float]:
    """`predict_items` in a new Python process; returns its predictions and its peak RSS (MB)."""
    with tempfile.TemporaryDirectory(prefix="slmops-eval-") as scratch:
        given, answers = Path(scratch) / "items.json", Path(scratch) / "predictions.json"
        given.write_text(json.dumps([item.model_dump(mode="json") for item in items]))
        command = [sys.executable, "-m", "tasks.evaluation", str(folder), kind.value]
        done = subprocess.run(
            [*command, str(given), str(answers)], capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"evaluation process for {folder} failed ({done.returncode}): {done.stderr[-2000:]}"
            )
        result = json.loads(answers.read_text())
    predictions = [Prediction.model_validate(p) for p in result["predictions"]]
    return predictions, float(result["peak_rss_mb"])


@contextlib.contextmanager
def _one_worker() -> Iterator[None]:
    """mlflow.genai.evaluate scores rows on 10 threads by default; against a SQLite store they
    queue for its 5 connections and time out (96 s for 60 rows, measured, against 7 s on one)."""
    names = ("MLFLOW_GENAI_EVAL_MAX_WORKERS", "MLFLOW_GENAI_EVAL_MAX_SCORER_WORKERS")
    before = {name: os.environ.get(name) for name in names}
    os.environ.update(dict.fromkeys(names, "1"))
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def _no_databricks_warmup(tracking_uri: str) -> Iterator[None]:
    """mlflow.genai.evaluate imports databricks.sdk before it scores (MLflow's
    `_warmup_databricks_sdk`: its worker threads must not race to import it); a store that is
    not Databricks never needs it, and the import is 1.5-4 s of a release here (measured)."""
    from mlflow.genai.evaluation import harness

    warmup = getattr(harness, "_warmup_databricks_sdk", None)
    if warmup is None or tracking_uri.startswith("databricks"):
        yield
        return
    harness._warmup_databricks_sdk = lambda: None  # type: ignore[attr-defined]
    try:
        yield
    finally:
        harness._warmup_databricks_sdk = warmup  # type: ignore[attr-defined]


def mlflow_scorers() -> list[Any]:
    """One MLflow code scorer per scorer family; each scores the items of its family only (the
    others get None, which MLflow leaves out of the family's mean)."""
    from mlflow.entities import Feedback
    from mlflow.genai.scorers import scorer

    def family(name: str) -> Any:
        @scorer(name=name)
        def check_answer(outputs: Any, expectations: dict[str, Any]) -> Feedback | None:
            check = CHECK.validate_python(expectations["check"])
            if SCORER_OF[check.kind] != name:
                return None
            verdict = score(check, outputs if isinstance(outputs, str) else "")
            return Feedback(value=verdict.passed, rationale=verdict.rationale)

        return check_answer

    return [family(name) for name in SCORERS]


def _score_with_mlflow(
    store: ModelStore,
    model_ref: LoggedModelRef,
    items: Sequence[EvalItem],
    predictions: Sequence[Prediction],
) -> list[ItemResult]:
    """Score the answers through `mlflow.genai.evaluate` on the model's run; one result per item."""
    import mlflow

    data = [
        {
            "inputs": {"id": item.id, "question": item.question},
            "outputs": prediction.answer or "",
            "expectations": {"check": item.check.model_dump(mode="json")},
        }
        for item, prediction in zip(items, predictions, strict=True)
    ]
    with (
        store.activated(),
        _one_worker(),
        _no_databricks_warmup(store.tracking_uri),
        mlflow.start_run(run_id=model_ref.run_id),
        contextlib.redirect_stdout(sys.stderr),  # its progress bar and banner are not our output
    ):
        result = mlflow.genai.evaluate(
            data=data, scorers=mlflow_scorers(), model_id=model_ref.model_id
        )
    if result.result_df is None:
        raise RuntimeError(
            f"mlflow.genai.evaluate returned no per-item results for {model_ref.model_uri}"
        )
    verdicts: dict[str, tuple[str, bool, str]] = {}
    for _, row in result.result_df.iterrows():
        item_id = row["request"]["id"]
        for name in SCORERS:
            value = row.get(f"{name}/value")
            if isinstance(value, bool) or value in (0, 1):
                verdicts[item_id] = (name, bool(value), str(row.get(f"{name}/rationale") or ""))
    results = []
    for item, prediction in zip(items, predictions, strict=True):
        if item.id not in verdicts:
            raise RuntimeError(f"mlflow.genai.evaluate returned no score for item {item.id!r}")
        name, passed, rationale = verdicts[item.id]
        results.append(
            ItemResult(
                id=item.id,
                question=item.question,
                answer=prediction.answer,
                passed=passed,
                scorer=name,
                rationale=prediction.error or rationale,
                latency_s=prediction.latency_s,
            )
        )
    return results


def log_on_run(
    store: ModelStore,
    model_ref: LoggedModelRef,
    metrics: Mapping[str, float],
    run_tags: Mapping[str, str],
) -> None:
    """Metrics (linked to the logged model) and tags on the model's run, in one write: a SQLite
    store commits each call on its own."""
    from mlflow.entities import Metric, RunTag

    now = int(time.time() * 1000)
    store.client().log_batch(
        model_ref.run_id,
        metrics=[
            Metric(key, float(value), now, 0, model_id=model_ref.model_id)
            for key, value in metrics.items()
        ],
        tags=[RunTag(key, value) for key, value in run_tags.items()],
    )


@task(cache_policy=EVALUATION_CACHE_POLICY, persist_result=True)
def evaluate_model(
    store: ModelStore,
    model_ref: LoggedModelRef,
    eval_set: EvalSet,
    measure_memory: bool = False,
) -> Evaluation:
    """Predict and score the set's items with one logged model; log the results on its run.

    Args:
        store: the MLflow store holding the model.
        model_ref: the logged model.
        eval_set: the loaded evaluation set (its content is part of the cache key).
        measure_memory: predict in a fresh process and record its peak RSS.
    """
    kind = model_ref.kind
    items = eval_set.for_kind(kind)
    folder = local_model_dir(store, model_ref)
    started = time.perf_counter()
    peak_rss_mb: float | None = None
    if measure_memory:
        predictions, peak_rss_mb = _predict_in_fresh_process(folder, kind, items)
    else:
        predictions = predict_items(folder, kind, items)
    predicted = time.perf_counter()
    results = _score_with_mlflow(store, model_ref, items, predictions)

    client = store.client()
    artifact = f"evaluation/{eval_set.name}/{kind.value}/items.json"
    client.log_dict(model_ref.run_id, {"items": [r.model_dump() for r in results]}, artifact)
    evaluation = summarize(
        results,
        eval_set=eval_set.name,
        eval_set_digest=eval_set.digest,
        model_uri=model_ref.model_uri,
        peak_rss_mb=peak_rss_mb,
        items_artifact=f"runs:/{model_ref.run_id}/{artifact}",
    )
    metrics = {
        "eval.score": evaluation.score,
        "eval.items": evaluation.items,
        "eval.passed": evaluation.passed,
        "eval.latency_p95_s": evaluation.latency_p95_s,
    }
    if peak_rss_mb is not None:
        metrics["eval.peak_rss_mb"] = peak_rss_mb
    log_on_run(
        store, model_ref, metrics, {tags.EVALUATION_SET: f"{eval_set.name}@{eval_set.digest[:12]}"}
    )
    _log().info(
        "%s on %s: %d/%d items (score %.3f), p95 %.3f s, predicted in %.1f s, scored in %.1f s",
        model_ref.model_uri, eval_set.name, evaluation.passed, evaluation.items, evaluation.score,
        evaluation.latency_p95_s, predicted - started, time.perf_counter() - predicted,
    )  # fmt: skip
    return evaluation


def item_results(store: ModelStore, evaluation: Evaluation) -> list[ItemResult]:
    """The per-item results behind an evaluation (from its run's artifact)."""
    import mlflow

    if not evaluation.items_artifact:
        return []
    with store.activated():
        loaded = mlflow.artifacts.load_dict(evaluation.items_artifact)
    return [ItemResult.model_validate(item) for item in loaded["items"]]


def record_evaluation(store: ModelStore, version: ModelVersionRef, evaluation: Evaluation) -> None:
    """Keep the evaluation on the registered version, where a later release finds it."""
    client = store.client()
    client.set_model_version_tag(
        version.name,
        str(version.version),
        tags.evaluation_tag(evaluation.eval_set),
        evaluation.model_dump_json(),
    )


def recorded_evaluation(
    store: ModelStore, version: ModelVersionRef, eval_set: EvalSet
) -> Evaluation | None:
    """The version's recorded evaluation on this set (same content), if there is one."""
    client = store.client()
    found = client.get_model_version(version.name, str(version.version))
    raw = (found.tags or {}).get(tags.evaluation_tag(eval_set.name))
    if raw is None:
        return None
    evaluation = Evaluation.model_validate_json(raw)
    return evaluation if evaluation.eval_set_digest == eval_set.digest else None


@task
def evaluate_champion(
    store: ModelStore,
    champion: ModelVersionRef,
    kind: WrapperKind,
    eval_set: EvalSet,
    measure_memory: bool = False,
) -> Evaluation:
    """The champion's evaluation on `eval_set`: the one recorded on its version, or a new one
    (then recorded there, so the next release reuses it)."""
    recorded = recorded_evaluation(store, champion, eval_set)
    if recorded is not None and (recorded.peak_rss_mb is not None or not measure_memory):
        return recorded
    client = store.client()
    version = client.get_model_version(champion.name, str(champion.version))
    model_id = version.model_id or str(version.source).removeprefix("models:/")
    if not model_id.startswith("m-") or not version.run_id:
        raise ValueError(f"{champion.uri} was not registered from a logged model: {version.source}")
    ref = LoggedModelRef(
        model_uri=f"models:/{model_id}", run_id=version.run_id, kind=kind, model_id=model_id
    )
    evaluation = evaluate_model.fn(store, ref, eval_set, measure_memory)
    record_evaluation(store, champion, evaluation)
    return evaluation


@task
def record_gate_decision(
    store: ModelStore,
    version: ModelVersionRef,
    model_ref: LoggedModelRef,
    decision: GateDecision,
    override_reason: str = "",
) -> None:
    """The decision and its evidence: tags on the version, metrics and tags on the run.

    Args:
        store: the MLflow store holding the run and the registered version.
        version: the challenger's registered version.
        model_ref: its logged model (the run the metrics go on).
        decision: the gate's decision.
        override_reason: why a forced promotion was forced (recorded when `decision.forced`).
    """
    client = store.client()
    version_tags = {
        tags.GATE: decision.verdict,
        tags.GATE_SUMMARY: decision.summary()[: tags.MAX_VALUE_CHARS],
        **{f"{tags.GATE}.{check.metric}": check.describe() for check in decision.checks},
    }
    if decision.forced:
        version_tags[tags.GATE_OVERRIDE] = override_reason[: tags.MAX_VALUE_CHARS]
    for key, value in version_tags.items():
        client.set_model_version_tag(version.name, str(version.version), key, value)
    run_tags = {tags.GATE: decision.verdict, tags.GATE_SUMMARY: version_tags[tags.GATE_SUMMARY]}
    if decision.forced:
        run_tags[tags.GATE_OVERRIDE] = version_tags[tags.GATE_OVERRIDE]
    metrics = {}
    for check in decision.checks:
        numbers = {
            "value": check.value,
            "champion": check.champion,
            "threshold": check.threshold,
            "passed": None if check.passed is None else float(check.passed),
        }
        for part, number in numbers.items():
            if number is not None:
                metrics[f"gate.{check.metric}.{part}"] = number
    log_on_run(store, model_ref, metrics, run_tags)


@task
def log_answer_agreement(
    store: ModelStore, reference: Evaluation, others: list[tuple[LoggedModelRef, Evaluation]]
) -> dict[str, float | None]:
    """Log on each other model's run how often its answers equal the reference wrapper's on the
    same items (`eval.agreement_with_transformers`): what int4 and the ONNX runtime changed."""
    reference_items = item_results(store, reference)
    client = store.client()
    agreements: dict[str, float | None] = {}
    for model_ref, evaluation in others:
        agreement = gate.answer_agreement(reference_items, item_results(store, evaluation))
        agreements[model_ref.model_uri] = agreement
        if agreement is not None:
            client.log_metric(
                model_ref.run_id,
                "eval.agreement_with_transformers",
                agreement,
                model_id=model_ref.model_id,
            )
    return agreements


def _main(argv: Sequence[str]) -> None:
    folder, kind, given, answers = argv
    items = [EvalItem.model_validate(item) for item in json.loads(Path(given).read_text())]
    predictions = predict_items(Path(folder), WrapperKind(kind), items)
    peak_rss_mb = own_peak_rss_mb()
    Path(answers).write_text(
        json.dumps(
            {"predictions": [p.model_dump() for p in predictions], "peak_rss_mb": peak_rss_mb}
        )
    )


if __name__ == "__main__":
    _main(sys.argv[1:])
