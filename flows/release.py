"""The release flow: fetch -> build both wrappers -> validate -> register -> promote -> serve."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import flow
from pydantic import BaseModel, ConfigDict

from flows._gate import compare_wrapper_answers, judge_challenger
from flows._hubs import connect_hub
from flows._runtime import run_from_command_line, task_results_under
from flows._serving import serve_champions
from slmops.config import OnnxExportSpec, ReleaseConfig, Settings, WrapperKind
from slmops.errors import ExplainedError
from slmops.eval_sets import EvalSet, load_eval_set
from slmops.expectations import SamplePrompt, known_answer_prompts, sample_prompts
from slmops.gate import Evaluation
from slmops.refs import LoggedModelRef, SnapshotRef
from slmops.reports import (
    ParityReport,
    ReleaseReport,
    ValidationReport,
    WrapperOutcome,
    release_markdown,
    validation_row,
)
from slmops.store import ModelStore
from slmops.tags import version_tags
from tasks.hub import fetch_model_snapshot, fetch_onnx_release
from tasks.mlflow_models import log_chat_pipeline, log_onnx_chat_model, log_onnx_prompt_model
from tasks.onnx_export import export_onnx
from tasks.onnx_storage import store_onnx_folder
from tasks.registry import champion_version, promote_version, register_version
from tasks.release_records import release_lease, settle_killed_releases
from tasks.reporting import publish_markdown, publish_table
from tasks.serving import make_room_for_model
from tasks.validation import compare_runtimes, unload_model, validate_model

EXPERIMENT = "slmops-release"


class ReleaseValidationError(ExplainedError):
    """At least one wrapper failed validation; it was registered but not promoted."""


class ReleaseGateError(ExplainedError):
    """The promotion gate refused at least one validated wrapper; it was registered, not promoted."""


def _release_run_name() -> str:
    from prefect.runtime import flow_run

    config = flow_run.parameters.get("config") or {}
    if isinstance(config, BaseModel):  # called from Python with a ReleaseConfig
        config = config.model_dump()
    hub = config.get("hub", {}) if isinstance(config, dict) else {}
    repo = str(hub.get("repo_id", "microsoft/Phi-3-mini-4k-instruct")).split("/")[-1]
    return f"release-{repo}@{hub.get('revision', 'main')}".lower()


@flow(name="release", flow_run_name=_release_run_name)
def release(config: ReleaseConfig = ReleaseConfig()) -> ReleaseReport:
    """Release a small language model as validated, registered and served MLflow models.

    Fetches the model pinned to a revision, builds the transformers chat wrapper and the
    onnxruntime-genai wrappers, validates each (signature, serving example, sample outputs),
    registers every wrapper as a new version, evaluates each validated one against the current
    champion (the promotion gate), promotes those that passed both (None -> Staging ->
    Production, @challenger -> @champion) and serves each Production model.

    Args:
        config: `hub` picks the model (source `embedded` = the tiny offline Phi-3 on a loopback
            hub; `hub` = the Hugging Face hub), `onnx` the ONNX export (built locally or the hub's
            release), `generation` the generation defaults, `evaluation` the evaluation set,
            `gate` the promotion gate's thresholds, `registry` the model names, `serve` what is
            served and where, `promote` whether versions that pass validation and the gate go
            to Production (`force` with `promote_reason`: past a failed gate, audited).
    """
    from prefect.runtime import flow_run

    settings = Settings.from_env()
    settings.home.mkdir(parents=True, exist_ok=True)
    settle_killed_releases(settings.home, ModelStore.from_settings(settings))
    with (
        task_results_under(settings.task_results_dir),
        release_lease(settings.home, flow_run.id, ModelStore.from_settings(settings)),
    ):
        return _release(config, settings)


def _release(config: ReleaseConfig, settings: Settings) -> ReleaseReport:
    eval_set = load_eval_set(config.evaluation.eval_set)  # a malformed set fails before any work
    store = ModelStore.from_settings(settings)
    with connect_hub(config.hub, settings) as hub:
        snapshot = fetch_model_snapshot(config.hub, hub)
        if config.onnx.source == "hub":
            onnx_dir = fetch_onnx_release(config.hub, hub)
        else:
            onnx_dir = export_onnx(snapshot.path, config.onnx, settings.cache_dir / "onnx")
    logged = log_wrappers(config, settings, snapshot, onnx_dir)
    known = known_answer_prompts(eval_set) if config.validation.reference_answers else ()
    parity = None
    if config.runtime_parity:
        # On the prompts validation asks, known answers included.
        prompts = [s.prompt() for s in sample_prompts(known)]
        parity = check_runtime_parity(config, settings, snapshot, onnx_dir, logged, prompts)

    outcomes = {
        kind: release_wrapper(config, settings, snapshot, ref, parity, eval_set, known)
        for kind, ref in logged.items()
    }
    compare_wrapper_answers(
        settings, logged,
        {kind: step.evaluation for kind, step in outcomes.items() if step.evaluation is not None},
    )  # fmt: skip
    publish_table(
        "validation-results",
        [validation_row(o.registered_model, o.validation) for o in outcomes.values()],
        "Validation of each wrapper built by this release",
    )
    if config.serve.enabled:
        served = serve_champions(config.serve, config.registry, settings)
        for kind, result in served.items():
            outcomes[kind] = outcomes[kind].with_serving(result.handle.url, result.answer)

    report = ReleaseReport(
        repo_id=snapshot.repo_id, commit=snapshot.commit, tracking_uri=store.tracking_uri,
        outcomes=tuple(o.outcome for o in outcomes.values()),
    )  # fmt: skip
    publish_markdown(
        "release-summary",
        release_markdown(report),
        "What this release registered, promoted and served",
    )
    for outcome in report.outcomes:
        if outcome.sample_answer is not None:
            print(
                f"{outcome.registered_model} v{outcome.production_version} at {outcome.endpoint}: {outcome.sample_answer!r}"
            )
    if report.failed:
        names = ", ".join(f"{o.registered_model} v{o.version}" for o in report.failed)
        raise ReleaseValidationError(
            f"validation failed for {names}; not promoted:\n"
            + "\n".join(o.validation_summary for o in report.failed)
            + "".join(
                f"\n{o.registered_model} v{o.version} {o.gate_summary}" for o in report.refused
            )
        )
    if report.refused and config.promote:
        raise ReleaseGateError(gate_refusal_message(report.refused))
    return report


def check_runtime_parity(
    config: ReleaseConfig,
    settings: Settings,
    snapshot: SnapshotRef,
    onnx_dir: Path,
    logged: dict[WrapperKind, LoggedModelRef],
    prompts: list[str],
) -> ParityReport:
    """Runtime parity on `prompts`, as `config.parity` sizes it: a small checkpoint against an
    fp32 export of it, a big one (Phi-3-mini) through the release's own int4 model, with no fp32
    export."""
    store, spec = ModelStore.from_settings(settings), config.parity
    run_id = logged[WrapperKind.PROMPT_ONNX].run_id
    weights = sum(p.stat().st_size for p in snapshot.path.glob("*.safetensors"))
    if spec.compares_int4(weights):
        return compare_runtimes(
            snapshot.path, onnx_dir, prompts=prompts, max_new_tokens=spec.max_new_tokens,
            min_agreement=spec.int4_min_agreement, store=store, run_id=run_id,
            onnx_precision="int4",
        )  # fmt: skip
    fp32_dir = export_onnx(
        snapshot.path, OnnxExportSpec(precision="fp32"), settings.cache_dir / "onnx"
    )
    return compare_runtimes(
        snapshot.path, fp32_dir, prompts=prompts, max_new_tokens=spec.max_new_tokens,
        min_agreement=spec.min_agreement, store=store, run_id=run_id,
    )  # fmt: skip


def gate_refusal_message(refused: list[WrapperOutcome]) -> str:
    """Which versions the gate refused, on which rules and numbers, and what stayed."""
    lines = []
    for o in refused:
        stays = f"v{o.production_version}" if o.production_version else "nothing"
        failed = [line for line in o.gate_summary.splitlines()[1:] if line.endswith("FAILED")]
        lines.append(
            f"promotion gate refused {o.registered_model} v{o.version} "
            f"(Production stays {stays}): " + "; ".join(failed)
        )
    return "\n".join(
        [*lines, "registered, not promoted; to promote anyway: promote: force with promote_reason"]
    )


def log_wrappers(
    config: ReleaseConfig, settings: Settings, snapshot: SnapshotRef, onnx_dir: Path
) -> dict[WrapperKind, LoggedModelRef]:
    """Log the three wrappers of one snapshot (each a cached task)."""
    source = {"repo_id": snapshot.repo_id, "revision": snapshot.revision, "commit": snapshot.commit}
    store, generation = ModelStore.from_settings(settings), config.generation
    # One stored copy of the ONNX folder per release, which both ONNX wrappers reference.
    onnx_uri = store_onnx_folder(store, EXPERIMENT, onnx_dir, config.onnx, source).artifact_uri
    return {
        WrapperKind.CHAT_TRANSFORMERS: log_chat_pipeline(
            store, EXPERIMENT, snapshot.path, generation, source
        ),
        WrapperKind.PROMPT_ONNX: log_onnx_prompt_model(
            store, EXPERIMENT, onnx_dir, generation, config.onnx, source, onnx_uri
        ),
        WrapperKind.CHAT_ONNX: log_onnx_chat_model(
            store, EXPERIMENT, onnx_dir, generation, config.onnx, source, onnx_uri
        ),
    }


class WrapperStep(BaseModel):
    """One wrapper's way through a release: its outcome, and the validation report behind it."""

    model_config = ConfigDict(frozen=True)

    outcome: WrapperOutcome
    validation: ValidationReport
    evaluation: Evaluation | None = None  # None: not evaluated (validation failed)

    @property
    def registered_model(self) -> str:
        return self.outcome.registered_model

    def with_serving(self, endpoint: str, answer: str) -> WrapperStep:
        served = self.outcome.model_copy(update={"endpoint": endpoint, "sample_answer": answer})
        return self.model_copy(update={"outcome": served})


def release_wrapper(
    config: ReleaseConfig,
    settings: Settings,
    snapshot: SnapshotRef,
    ref: LoggedModelRef,
    parity: ParityReport | None,
    eval_set: EvalSet,
    known_answers: tuple[SamplePrompt, ...],
) -> WrapperStep:
    """Validate one logged wrapper (`known_answers`: prompts whose answers must come out),
    register it, judge it at the promotion gate, and promote it if it passed both (or the gate
    was forced)."""
    kind, store = ref.kind, ModelStore.from_settings(settings)
    if config.serve.enabled:
        # Validation loads the new version beside the running servers: memory-safe order.
        make_room_for_model(
            ref.model_uri, config.registry.model_name(kind), settings.servers_dir,
            store, config.serve.memory_budget_gb,
        )  # fmt: skip
    report = validate_model(
        store, ref, known_answers=known_answers,
        parity=parity if kind is not WrapperKind.CHAT_TRANSFORMERS else None,
    )  # fmt: skip
    name = config.registry.model_name(kind)
    onnx_options = (
        config.onnx.model_dump_json() if kind is not WrapperKind.CHAT_TRANSFORMERS else ""
    )
    tags = version_tags(
        snapshot.repo_id, snapshot.commit, onnx_options, report.passed, report.summary()
    )
    version = register_version(store, ref.model_uri, name, tags, settings.registry_locks)
    promoted = False
    evaluation, decision = (
        judge_challenger(config, settings, eval_set, ref, version)
        if report.passed
        else (None, None)
    )
    unload_model()  # validated and evaluated: its memory goes back before anything is served
    if report.passed and config.promote and (decision is None or decision.promote):
        reason = f"release of {snapshot.repo_id}@{snapshot.commit[:12]}: validation passed"
        if decision is not None and not decision.passed:
            failures = "; ".join(check.describe() for check in decision.failures)
            reason = (
                f"{reason}; FORCED past the promotion gate ({failures}): {config.promote_reason}"
            )
        elif decision is not None:
            reason = f"{reason}, promotion gate passed"
        promotion = promote_version(store, version, reason, settings.registry_locks)
        promoted = True
        publish_table(
            f"{name}-registry-moves",
            [e.model_dump() for e in promotion.audit],
            f"Stage and alias moves of {name}",
        )
    champion = champion_version(store, name)
    outcome = WrapperOutcome(
        kind=kind,
        registered_model=name,
        model_uri=ref.model_uri,
        version=version.version,
        validation_passed=report.passed,
        validation_summary=report.summary(),
        promoted=promoted,
        production_version=champion.version if champion else None,
        gate=decision.verdict if decision else None,
        gate_summary=decision.summary() if decision else "",
    )
    return WrapperStep(outcome=outcome, validation=report, evaluation=evaluation)


def load_config(argument: str | None) -> ReleaseConfig:
    """A ReleaseConfig from a parameter file (deployments/*.yaml), a JSON string, or defaults."""
    if argument is None:
        return ReleaseConfig()
    if argument.endswith((".yaml", ".yml")):
        import yaml

        with open(argument) as handle:
            return ReleaseConfig.model_validate(yaml.safe_load(handle)["config"])
    return ReleaseConfig.model_validate_json(argument)


if __name__ == "__main__":
    import sys

    config = load_config(sys.argv[1] if len(sys.argv) > 1 else None)
    report = run_from_command_line(lambda: release(config))
    print(json.dumps(report.model_dump(mode="json"), indent=2))
