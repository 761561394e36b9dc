"""The promotion gate in a release: evaluate the challenger and the champion, decide, record."""

from __future__ import annotations

from collections.abc import Mapping

from slmops.config import ReleaseConfig, Settings, WrapperKind
from slmops.eval_sets import EvalSet
from slmops.gate import Evaluation, GateDecision, changed_answers, decide
from slmops.refs import LoggedModelRef, ModelVersionRef
from slmops.store import ModelStore
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
) -> tuple[Evaluation, GateDecision | None]:
    """Evaluate a validated version and decide whether it may replace the champion.

    The decision is None when the version already is the champion (an unchanged re-run).
    """
    store, measure_memory = ModelStore.from_settings(settings), config.evaluation.measure_memory
    challenger = evaluate_model(store, ref, eval_set, measure_memory)
    record_evaluation(store, version, challenger)
    champion_ref = champion_version(store, version.name)
    if champion_ref is not None and champion_ref.version == version.version:
        return challenger, None
    champion = (
        evaluate_champion(store, champion_ref, ref.kind, eval_set, measure_memory)
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
    record_gate_decision(store, version, ref, decision, config.promote_reason)
    publish_table(
        f"{version.name}-gate",
        [check.model_dump() for check in decision.checks],
        f"Promotion gate of {version.uri}: {decision.verdict}",
    )
    if champion is not None:
        publish_table(
            f"{version.name}-changed-answers",
            changed_answers(item_results(store, champion), item_results(store, challenger)),
            f"Items answered differently by {version.uri} and champion v{decision.champion_version}",
        )
    return challenger, decision


def compare_wrapper_answers(
    settings: Settings,
    logged: Mapping[WrapperKind, LoggedModelRef],
    evaluations: Mapping[WrapperKind, Evaluation],
) -> None:
    """Log how often each ONNX wrapper answers like the transformers one on the set's items."""
    reference = evaluations.get(WrapperKind.CHAT_TRANSFORMERS)
    others = [
        (logged[kind], evaluation)
        for kind, evaluation in evaluations.items()
        if kind is not WrapperKind.CHAT_TRANSFORMERS
    ]
    if reference is not None and others:
        log_answer_agreement(ModelStore.from_settings(settings), reference, others)
