"""The promotion gate in a release: evaluate the challenger and the champion, decide, record."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from slmops.config import ReleaseConfig, Settings, WrapperKind
from slmops.eval_sets import EvalSet
from slmops.gate import GateDecision, changed_answers, decide
from slmops.refs import LoggedModelRef, ModelVersionRef
from tasks.evaluation import (
    evaluate_champion,
    evaluate_model,
    item_results,
    log_answer_agreement,
    record_evaluation,
    record_gate_decision,
)
from tasks.registry import champion_version
from tasks.reporting import publish_table


def judge_challenger(
    config: ReleaseConfig,
    settings: Settings,
    eval_set: EvalSet,
    ref: LoggedModelRef,
    version: ModelVersionRef,
) -> GateDecision | None:
    """Evaluate a validated version and decide whether it may replace the champion.

    None when the version already is the champion (an unchanged re-run): nothing to decide.
    """
    uri, measure_memory = settings.tracking_uri, config.evaluation.measure_memory
    challenger = evaluate_model(uri, ref, eval_set, measure_memory)
    record_evaluation(uri, version, challenger)
    champion_ref = champion_version(uri, version.name)
    if champion_ref is not None and champion_ref.version == version.version:
        return None
    champion = (
        evaluate_champion(uri, champion_ref, ref.kind, eval_set, measure_memory)
        if champion_ref is not None
        else None
    )
    decision = decide(
        challenger,
        champion,
        config.gate,
        champion_version=champion_ref.version if champion_ref else None,
        force=config.force_promotion,
    )
    record_gate_decision(uri, version, ref, decision, config.promote_reason)
    publish_table(
        f"{version.name}-gate",
        [check.model_dump() for check in decision.checks],
        f"Promotion gate of {version.uri}: {decision.verdict}",
    )
    if champion is not None:
        publish_table(
            f"{version.name}-changed-answers",
            changed_answers(item_results(uri, champion), item_results(uri, challenger)),
            f"Items answered differently by {version.uri} and champion v{champion_ref.version}",  # type: ignore[union-attr]
        )
    return decision


def compare_wrapper_answers(
    config: ReleaseConfig,
    settings: Settings,
    eval_set: EvalSet,
    logged: Mapping[WrapperKind, LoggedModelRef],
    evaluated: Iterable[WrapperKind],
) -> None:
    """Log how often each ONNX wrapper answers like the transformers one on the set's items (the
    evaluations are the gate's, reused from the task cache)."""
    kinds = set(evaluated)
    reference_kind = WrapperKind.CHAT_TRANSFORMERS
    if reference_kind not in kinds:
        return
    uri, measure_memory = settings.tracking_uri, config.evaluation.measure_memory
    reference = evaluate_model(uri, logged[reference_kind], eval_set, measure_memory)
    for kind in sorted(kinds - {reference_kind}):
        evaluation = evaluate_model(uri, logged[kind], eval_set, measure_memory)
        log_answer_agreement(uri, logged[kind], reference, evaluation)
