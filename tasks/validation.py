"""Validate logged models: signature, serving example, sample outputs, and runtime parity.

Every task reads the model through the given store (never MLflow's process-wide one) and
returns a small frozen report with `passed`; `validate_model` combines them into the
`ValidationReport` the release flow promotes on. Results are written back onto the model's run:
the great-expectations result JSON and the sample outputs as artifacts, and pass counts,
latency and throughput as metrics linked to the LoggedModel.
"""

from __future__ import annotations

import gc
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from prefect import get_run_logger, task
from prefect.cache_policies import INPUTS, TASK_SOURCE
from prefect.exceptions import MissingContextError
from pydantic import BaseModel, ConfigDict

from slmops import expectations, signatures, tags
from slmops.config import GenerationSpec, WrapperKind
from slmops.expectations import (
    OutputSuiteSpec,
    SamplePrompt,
    model_input,
    run_output_suite,
    sample_frame,
    sample_prompts,
    sample_row,
)
from slmops.processes import checkout_env, own_peak_rss_mb
from slmops.refs import LoggedModelRef
from slmops.reports import (
    OutputReport,
    ParityReport,
    ServingExampleReport,
    SignatureReport,
    ValidationReport,
)
from slmops.signatures import expected_signature, input_example, signature_diff
from slmops.store import ModelStore
from tasks.caching import WhileResultIsLive, logged_model_exists, run_exists, source_of

VALIDATION_TAG = tags.VALIDATION

# A verdict depends on this module's checks, the expectation suite and the expected
# signatures, not only on the task function's lines; and a cached verdict is reused only while
# the model (or run) it was about still exists.
VALIDATION_CACHE_POLICY_SOURCES = source_of(sys.modules[__name__], expectations, signatures)
VALIDATION_CACHE_POLICY = WhileResultIsLive(
    base=INPUTS + TASK_SOURCE + VALIDATION_CACHE_POLICY_SOURCES,
    is_live=lambda report, inputs: logged_model_exists(inputs["store"], report.model.model_id),
)
PARITY_CACHE_POLICY = WhileResultIsLive(
    base=INPUTS + TASK_SOURCE + VALIDATION_CACHE_POLICY_SOURCES,
    is_live=lambda report, inputs: (
        not (inputs.get("store") and inputs.get("run_id"))
        or run_exists(inputs["store"], inputs["run_id"])
    ),
)


def _logger() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    try:
        return get_run_logger()
    except MissingContextError:  # called via .fn outside a flow
        return logging.getLogger(__name__)


def local_model_dir(store: ModelStore, model_ref: LoggedModelRef) -> Path:
    """The model's artifacts on local disk (no copy for a local store).

    Resolved through `store.client()`: `download_artifacts("models:/m-...", tracking_uri=...)`
    looks the LoggedModel up in the process-wide store instead.
    """
    import mlflow

    location = store.client().get_logged_model(model_ref.model_id).artifact_location
    return Path(
        mlflow.artifacts.download_artifacts(artifact_uri=location, tracking_uri=store.tracking_uri)
    )


# The release validates, registers and evaluates one wrapper before the next, and the
# evaluation asks the model validation just loaded, some of the same questions (the tiny
# model's known answers are its evaluation set). So the model is kept, one at a time (a second
# Phi-3-sized copy in the flow process would not fit beside the servers), with what it answered.
class _KeptModel:
    def __init__(self, folder: Path) -> None:
        import mlflow

        self.folder = folder
        self.model = mlflow.pyfunc.load_model(str(folder))
        self.answers: dict[str, tuple[Any, float]] = {}


_KEPT: list[_KeptModel] = []
# Two threads asking two models each get their own (the second load then drops the first).
_KEEPING = threading.Lock()


def _kept(folder: Path) -> _KeptModel:
    with _KEEPING:
        if not _KEPT or _KEPT[0].folder != folder:
            _KEPT.clear()
            gc.collect()
            _KEPT.append(_KeptModel(folder))
        return _KEPT[0]


def is_loaded(folder: Path) -> bool:
    """Whether the model in `folder` is the one kept (loaded, and asked before)."""
    return bool(_KEPT) and _KEPT[0].folder == folder


def load_model(folder: Path) -> Any:
    """The pyfunc model in `folder`, loaded once for validation and the evaluation after it;
    loading another drops it (`unload_model` drops it now)."""
    return _kept(folder).model


def ask_model(folder: Path, request: dict[str, Any]) -> tuple[Any, float]:
    """The model's answer to one request and its latency (s). A request asked before is answered
    with what the model said then: generation is greedy (and a sampled answer is as much the
    model's), and the latency is the one measured then. A failed request raises."""
    kept = _kept(folder)
    key = json.dumps(request, sort_keys=True, default=str)
    if key not in kept.answers:
        started = time.perf_counter()
        output = kept.model.predict(request)
        kept.answers[key] = (output, time.perf_counter() - started)
    return kept.answers[key]


def unload_model() -> None:
    """Drop the kept model and its answers, so that its memory can go back."""
    with _KEEPING:
        _KEPT.clear()
    gc.collect()


@task
def validate_signature(
    store: ModelStore, model_ref: LoggedModelRef, kind: WrapperKind | None = None
) -> SignatureReport:
    """Compare the logged signature with the one `kind` (default: the ref's kind) must have."""
    from mlflow.models import Model

    kind = kind or model_ref.kind
    logged = Model.load(str(local_model_dir(store, model_ref) / "MLmodel")).signature
    differences = signature_diff(expected_signature(kind), logged)
    for line in differences:
        _logger().warning("signature of %s: %s", model_ref.model_uri, line)
    return SignatureReport(
        kind=kind,
        model_uri=model_ref.model_uri,
        passed=not differences,
        differences=tuple(differences),
    )


def _output_problem(kind: WrapperKind, output: Any) -> str | None:
    """Why a prediction for one request is not the shape `kind` promises, or None."""
    if not isinstance(output, list) or len(output) != 1:
        return f"expected a list with one prediction, got {type(output).__name__}: {output!r:.200}"
    (item,) = output
    if kind is WrapperKind.PROMPT_ONNX:
        ok = isinstance(item, str) and bool(item.strip())
        return None if ok else f"expected a non-empty string, got {item!r:.200}"
    try:
        content = item["choices"][0]["message"]["content"]
        usage = item["usage"]
        counts = [usage[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")]
    except (KeyError, IndexError, TypeError):
        return f"expected a chat completion, got {item!r:.200}"
    if not isinstance(content, str) or not content.strip():
        return f"empty completion: {item!r:.200}"
    if not all(isinstance(c, int) for c in counts):
        return f"usage counts are not integers: {usage!r}"
    return None


@task
def validate_serving_example(
    store: ModelStore, model_ref: LoggedModelRef, kind: WrapperKind | None = None
) -> ServingExampleReport:
    """Replay the kind's input example as `/invocations` would and check the answer's shape."""
    from mlflow.models import convert_input_example_to_serving_input, validate_serving_input

    kind = kind or model_ref.kind
    payload = convert_input_example_to_serving_input(input_example(kind))
    try:
        with warnings.catch_warnings():
            # Deprecated since MLflow 3.13 in favour of `mlflow.models.predict`, which runs the
            # model in a subprocess environment; this replays /invocations in-process.
            warnings.simplefilter("ignore", FutureWarning)
            output = validate_serving_input(str(local_model_dir(store, model_ref)), payload)
    except Exception as error:  # any failure to serve the example is the finding
        return ServingExampleReport(
            kind=kind,
            model_uri=model_ref.model_uri,
            passed=False,
            error=f"{type(error).__name__}: {error}"[:2000],
        )
    problem = _output_problem(kind, output)
    return ServingExampleReport(
        kind=kind,
        model_uri=model_ref.model_uri,
        passed=problem is None,
        error=problem,
        output_preview=repr(output)[:500],
    )


def _logged_max_new_tokens(folder: Path) -> int:
    """The token budget the model was logged with (the pyfunc `config` of both flavors)."""
    from mlflow.models import Model

    config = Model.load(str(folder / "MLmodel")).flavors.get("python_function", {}).get("config")
    return int((config or {}).get("max_new_tokens", GenerationSpec().max_new_tokens))


@task
def validate_outputs(
    store: ModelStore,
    model_ref: LoggedModelRef,
    kind: WrapperKind | None = None,
    generation: GenerationSpec | None = None,
    known_answers: Sequence[SamplePrompt] = (),
    prompts: Sequence[SamplePrompt] | None = None,
) -> OutputReport:
    """Predict the fixed sample prompts and check them with the great-expectations suite.

    Args:
        store: the MLflow store holding the model.
        model_ref: the logged model.
        kind: the wrapper kind to validate as (default: the ref's kind).
        generation: the options the model was logged with; default: read from the model
            (its token budget bounds the completion-length checks).
        known_answers: prompts whose expected answers must come out, asked after the family's
            validation prompts (`expectations.known_answer_prompts`; none for a real model).
        prompts: override all sample prompts.
    """
    kind = kind or model_ref.kind
    folder = local_model_dir(store, model_ref)
    max_tokens = generation.max_new_tokens if generation else _logged_max_new_tokens(folder)
    samples = tuple(prompts) if prompts is not None else sample_prompts(known_answers)
    check_known_answers = any(sample.expected is not None for sample in samples)
    rows, latencies, errors = [], [], []
    for sample in samples:
        started = time.perf_counter()
        try:
            output, latency = ask_model(folder, model_input(kind, sample))
        except Exception as error:  # a sample the model cannot answer is a finding, not a crash
            output, latency = None, time.perf_counter() - started
            errors.append(f"{sample.question!r}: {type(error).__name__}: {error}"[:500])
        latencies.append(latency)
        rows.append(sample_row(kind, sample, output, max_tokens))
    frame = sample_frame(rows)
    spec = OutputSuiteSpec(
        kind=kind, max_tokens=max_tokens, check_known_answers=check_known_answers
    )
    outcome = run_output_suite(frame, spec)

    tokens_per_s = None
    if spec.has_usage and frame["completion_tokens"].notna().all():
        tokens_per_s = float(frame["completion_tokens"].sum()) / max(sum(latencies), 1e-9)
    client = store.client()
    artifact = f"validation/{kind.value}/gx_result.json"
    client.log_dict(model_ref.run_id, outcome.result, artifact)
    client.log_dict(
        model_ref.run_id,
        {"rows": frame.astype(object).where(frame.notna(), None).to_dict(orient="records")},
        f"validation/{kind.value}/samples.json",
    )
    metrics = {
        "validation.samples": len(samples),
        "validation.expectations_evaluated": outcome.evaluated,
        "validation.expectations_passed": outcome.passed,
        "validation.predict_errors": len(errors),
        "validation.latency_mean_s": statistics.fmean(latencies),
        "validation.latency_max_s": max(latencies),
    }
    if tokens_per_s is not None:
        metrics["validation.tokens_per_s"] = tokens_per_s
    for key, value in metrics.items():
        client.log_metric(model_ref.run_id, key, float(value), model_id=model_ref.model_id)

    failures = tuple(errors) + outcome.failures
    for line in failures:
        _logger().warning("outputs of %s: %s", model_ref.model_uri, line)
    return OutputReport(
        kind=kind,
        model_uri=model_ref.model_uri,
        passed=outcome.success and not errors,
        samples=len(samples),
        expectations_evaluated=outcome.evaluated,
        expectations_passed=outcome.passed,
        failures=failures,
        mean_latency_s=statistics.fmean(latencies),
        tokens_per_s=tokens_per_s,
        result_artifact=f"runs:/{model_ref.run_id}/{artifact}",
    )


def _transformers_greedy(
    snapshot_dir: Path, prompts: Sequence[str], max_new_tokens: int, dtype: str = "float32"
):
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(snapshot_dir, add_bos_token=False)
    model: Any = transformers.AutoModelForCausalLM.from_pretrained(
        snapshot_dir, dtype=torch.float32 if dtype == "float32" else "auto"
    )
    model.eval()
    results = []
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
        prompt_ids = ids["input_ids"][0].tolist()
        results.append((prompt_ids, out[0, len(prompt_ids) :].tolist()))
    return results


def _onnx_greedy(onnx_dir: Path, prompts: Sequence[str], max_new_tokens: int):
    from slmops.onnx_genai_runtime import OnnxGenerator

    # The loop the ONNX wrappers serve with, stopped only by an end token or the budget.
    generator = OnnxGenerator(onnx_dir)
    results = []
    for prompt in prompts:
        ids = generator.encode(prompt)
        results.append((ids, generator.generate(ids, max_new_tokens)))
    return results


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return min(len(a), len(b))


# The comparison is a fact about the snapshot's and the export's content (both paths are
# content-addressed), so an unchanged re-run reuses it instead of loading both runtimes again.
@task(cache_policy=PARITY_CACHE_POLICY, persist_result=True)
def compare_runtimes(
    snapshot_dir: Path,
    onnx_dir: Path,
    prompts: Sequence[str] | None = None,
    max_new_tokens: int = 32,
    min_agreement: float = 0.95,
    store: ModelStore | None = None,
    run_id: str | None = None,
    onnx_precision: Literal["fp32", "int4"] = "fp32",
) -> ParityReport:
    """Greedy transformers against greedy onnxruntime-genai, token by token.

    A prompt agrees up to the first differing token (after a divergence the two continue from
    different text, so later positions say nothing). Agreement is agreeing / compared tokens.

    Args:
        snapshot_dir: the Hugging Face snapshot.
        onnx_dir: its onnxruntime-genai model: an fp32 export, or the int4 release.
        prompts: raw prompts (default: the sample prompts in the Phi-3 chat template).
        max_new_tokens: tokens generated per prompt.
        min_agreement: the agreement needed to pass.
        store: with `run_id`, where to log the agreement metrics.
        run_id: the run to log them on.
        onnx_precision: `fp32`: transformers runs in fp32 (an exact comparison); `int4`: in
            the checkpoint's own dtype (bf16 for Phi-3: no fp32 copy of a big model in memory).
    """
    prompts = list(prompts) if prompts is not None else [s.prompt() for s in sample_prompts()]
    dtype = "float32" if onnx_precision == "fp32" else "auto"
    torch_results = _transformers_greedy(snapshot_dir, prompts, max_new_tokens, dtype)
    onnx_results = _onnx_greedy(onnx_dir, prompts, max_new_tokens)
    compared = agreeing = 0
    mismatches = []
    tokenizer_mismatches = 0
    for prompt, (t_prompt, t_new), (o_prompt, o_new) in zip(
        prompts, torch_results, onnx_results, strict=True
    ):
        if t_prompt != o_prompt:
            tokenizer_mismatches += 1
            mismatches.append(
                f"{prompt!r:.60}: tokenizers differ ({len(t_prompt)} vs {len(o_prompt)} ids)"
            )
        length = max(len(t_new), len(o_new))
        same = _common_prefix(t_new, o_new)
        compared += length
        agreeing += same
        if same < length:
            mismatches.append(
                f"{prompt!r:.60}: diverges at new token {same} "
                f"(transformers {t_new[same : same + 1]}, onnx {o_new[same : same + 1]})"
            )
    agreement = agreeing / compared if compared else 1.0
    report = ParityReport(
        passed=agreement >= min_agreement and tokenizer_mismatches == 0,
        prompts=len(prompts),
        compared_tokens=compared,
        agreeing_tokens=agreeing,
        agreement=agreement,
        min_agreement=min_agreement,
        tokenizer_mismatches=tokenizer_mismatches,
        mismatches=tuple(mismatches),
        onnx_precision=onnx_precision,
        reference_dtype=dtype,
    )
    _logger().info(
        "runtime parity (onnx %s vs transformers %s): %d/%d tokens agree (%.3f) over %d prompts",
        onnx_precision, dtype, agreeing, compared, agreement, len(prompts),
    )  # fmt: skip
    if store is not None and run_id:
        client = store.client()
        client.log_metric(run_id, "parity.agreement", agreement)
        client.log_metric(run_id, "parity.compared_tokens", compared)
        client.set_tag(run_id, tags.PARITY, "passed" if report.passed else "failed")
        client.set_tag(run_id, tags.PARITY_COMPARED, f"onnx {onnx_precision} vs {dtype}")
    return report


@task(cache_policy=VALIDATION_CACHE_POLICY, persist_result=True)
def validate_model(
    store: ModelStore,
    model_ref: LoggedModelRef,
    generation: GenerationSpec | None = None,
    known_answers: tuple[SamplePrompt, ...] = (),
    parity: ParityReport | None = None,
    fresh_process: bool = False,
) -> ValidationReport:
    """All checks for one logged model; tags its run `slmops.validation=passed|failed`.

    Args:
        store: the MLflow store holding the model.
        model_ref: the logged model.
        generation: the options the model was logged with (default: read from the model).
        known_answers: prompts whose expected answers must come out (none for a real model).
        parity: the runtime comparison, for ONNX models, if one was run.
        fresh_process: load the model in a new Python process, whose memory goes back to the
            machine when it exits (and whose peak RSS is recorded).
    """
    request = ValidationRequest(
        store=store, model_ref=model_ref, generation=generation, known_answers=known_answers
    )
    report = _check_in_fresh_process(request) if fresh_process else check_model(request)
    report = report.model_copy(update={"parity": parity})
    client = store.client()
    verdict = "passed" if report.passed else "failed"
    client.set_tag(model_ref.run_id, VALIDATION_TAG, verdict)
    client.set_logged_model_tags(model_ref.model_id, {VALIDATION_TAG: verdict})
    client.set_tag(model_ref.run_id, tags.VALIDATION_SUMMARY, report.summary()[:5000])
    if report.peak_rss_mb is not None:
        client.log_metric(
            model_ref.run_id, "validation.peak_rss_mb", report.peak_rss_mb,
            model_id=model_ref.model_id,
        )  # fmt: skip
    return report


class ValidationRequest(BaseModel):
    """What `check_model` needs, as JSON for a fresh process."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    store: ModelStore
    model_ref: LoggedModelRef
    generation: GenerationSpec | None = None
    known_answers: tuple[SamplePrompt, ...] = ()


def check_model(request: ValidationRequest) -> ValidationReport:
    """Signature, serving example and sample outputs of one logged model, in this process."""
    store, model_ref = request.store, request.model_ref
    return ValidationReport(
        model=model_ref,
        signature=validate_signature.fn(store, model_ref),
        serving_example=validate_serving_example.fn(store, model_ref),
        outputs=validate_outputs.fn(
            store, model_ref, generation=request.generation, known_answers=request.known_answers
        ),
    )


def _check_in_fresh_process(request: ValidationRequest) -> ValidationReport:
    """`check_model` in a new Python process (`python -m tasks.validation`)."""
    with tempfile.TemporaryDirectory(prefix="slmops-validate-") as scratch:
        given, found = Path(scratch) / "request.json", Path(scratch) / "report.json"
        given.write_text(request.model_dump_json())
        done = subprocess.run(
            [sys.executable, "-m", "tasks.validation", str(given), str(found)],
            capture_output=True, text=True, check=False, env=checkout_env(),
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(
                f"validation process for {request.model_ref.model_uri} failed "
                f"({done.returncode}): {done.stderr[-2000:]}"
            )
        report = ValidationReport.model_validate_json(found.read_text())
    for line in report.outputs.failures:  # logged by the fresh process, into its stderr
        _logger().warning("outputs of %s: %s", request.model_ref.model_uri, line)
    _logger().info(
        "validated %s in a fresh process: peak RSS %.0f MB",
        request.model_ref.model_uri, report.peak_rss_mb or 0.0,
    )  # fmt: skip
    return report


def _main(argv: Sequence[str]) -> None:
    given, found = argv
    report = check_model(ValidationRequest.model_validate_json(Path(given).read_text()))
    peak_rss_mb = own_peak_rss_mb()
    Path(found).write_text(report.model_copy(update={"peak_rss_mb": peak_rss_mb}).model_dump_json())


if __name__ == "__main__":
    _main(sys.argv[1:])
