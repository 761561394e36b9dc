"""Validation: signatures, serving examples, GX-checked sample outputs and runtime parity.

Each kind of broken wrapper has a test that fails if the check that catches it is removed.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import mlflow
import pytest
from mlflow.models import ModelSignature, infer_signature
from mlflow.types.schema import ColSpec, DataType, ParamSchema, ParamSpec, Schema

import tasks.validation as validation
from offline_kit.tiny_model import TRAINED_ANSWERS
from slmops.config import GenerationSpec, OnnxExportSpec, WrapperKind
from slmops.eval_sets import load_eval_set
from slmops.expectations import (
    OutputSuiteSpec,
    SamplePrompt,
    known_answer_prompts,
    model_input,
    run_output_suite,
    sample_frame,
    sample_prompts,
    sample_row,
)
from slmops.families import PHI3
from slmops.refs import LoggedModelRef
from slmops.reports import ParityReport, ValidationReport
from slmops.signatures import (
    CHAT_SIGNATURE_V1,
    PROMPT_SIGNATURE,
    chat_signature,
    expected_signature,
    signature_diff,
)
from slmops.store import ModelStore
from tasks.mlflow_models import (
    experiment_id,
)
from tasks.onnx_export import export_onnx
from tasks.validation import (
    VALIDATION_TAG,
    compare_runtimes,
    validate_model,
    validate_outputs,
    validate_serving_example,
    validate_signature,
)

SOURCE = {"repo": "slmops/tiny-phi3", "commit": "0123abcd"}
GENERATION = GenerationSpec(max_new_tokens=32)
# What a release of the tiny model asks besides the family's prompts (reference_answers: true).
KNOWN = known_answer_prompts(load_eval_set("tiny-phi3"))
PROMPT_ONNX_FILE = Path(validation.__file__).parents[1] / "slmops" / "onnx_prompt_model.py"


def _fakes(store: ModelStore) -> str:
    # Not the Default experiment: its artifacts would land in ./mlruns of the working directory.
    return experiment_id(store, "fakes")


def log_fake(
    store: ModelStore,
    tmp_path: Path,
    kind: WrapperKind,
    predict_body: str,
    signature: ModelSignature | None = None,
    **log_kwargs,
) -> LoggedModelRef:
    """Log a models-from-code wrapper whose predict is `predict_body` (over `model_input`)."""
    code = tmp_path / f"fake_{kind.value.replace('-', '_')}.py"
    code.write_text(
        textwrap.dedent(
            """
            import mlflow

            class Fake(mlflow.pyfunc.PythonModel):
                def predict(self, context, model_input, params=None):
            {body}

            mlflow.models.set_model(Fake())
            """
        ).format(body=textwrap.indent(textwrap.dedent(predict_body).strip(), " " * 8))
    )
    with store.activated(), mlflow.start_run(experiment_id=_fakes(store)) as run:
        info = mlflow.pyfunc.log_model(
            name="fake",
            python_model=str(code),
            signature=signature or expected_signature(kind),
            pip_requirements=["mlflow"],
            **log_kwargs,
        )
    return LoggedModelRef(
        model_uri=info.model_uri, run_id=run.info.run_id, kind=kind, model_id=info.model_id
    )


def chat_reply(content: str, usage: str, finish: str = "stop") -> str:
    return f"""
        return [{{
            "id": "x", "object": "chat.completion", "created": 1, "model": "fake",
            "choices": [{{"index": 0, "finish_reason": "{finish}",
                         "message": {{"role": "assistant", "content": {content}}}}}],
            "usage": {usage},
        }}]
    """


GOOD_USAGE = '{"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}'


# --- signature_diff (unit) --------------------------------------------------------------------


@pytest.mark.unit
def test_equal_signatures_have_no_differences():
    assert signature_diff(chat_signature(), chat_signature()) == []
    assert signature_diff(PROMPT_SIGNATURE, infer_signature({"prompt": "hi"}, ["Run"])) == []
    assert signature_diff(None, None) == []


@pytest.mark.unit
def test_signature_diff_names_each_difference():
    actual = ModelSignature(
        inputs=Schema([ColSpec(DataType.string, "text"), ColSpec(DataType.long, "n")]),
        outputs=Schema([ColSpec(DataType.long)]),
        params=ParamSchema([ParamSpec("temperature", DataType.double, 0.2)]),
    )
    assert signature_diff(PROMPT_SIGNATURE, actual) == [
        "inputs: missing column 'prompt' (string, required)",
        "inputs: extra column 'text' (string, required)",
        "inputs: extra column 'n' (long, required)",
        "outputs.#0: type long, expected string",
        "params: extra 'temperature': double (default: 0.2)",
    ]
    optional = ModelSignature(
        inputs=Schema([ColSpec(DataType.string, "prompt", required=False)]),
        outputs=PROMPT_SIGNATURE.outputs,
    )
    assert signature_diff(PROMPT_SIGNATURE, optional) == [
        "inputs.prompt: optional, expected required"
    ]
    assert signature_diff(PROMPT_SIGNATURE, None) == ["signature: missing"]


@pytest.mark.unit
def test_signature_diff_reaches_into_nested_chat_types():
    lines = signature_diff(chat_signature(), CHAT_SIGNATURE_V1)
    if chat_signature() == CHAT_SIGNATURE_V1:  # an MLflow without its own definition
        assert lines == []
        return
    assert "inputs.messages[].content: required, expected optional" in lines
    assert "outputs.choices[].message.content: required, expected optional" in lines
    assert any(line.startswith("inputs: missing column 'tools'") for line in lines)


@pytest.mark.unit
def test_signature_diff_notices_a_column_order_change():
    a = Schema([ColSpec(DataType.string, "a"), ColSpec(DataType.string, "b")])
    b = Schema([ColSpec(DataType.string, "b"), ColSpec(DataType.string, "a")])
    lines = signature_diff(ModelSignature(inputs=a), ModelSignature(inputs=b))
    assert len(lines) == 1 and "another order" in lines[0]


# --- the output suite (unit) --------------------------------------------------------------------


def _rows(kind: WrapperKind, outputs: list, max_tokens: int = 32) -> list[dict]:
    samples = KNOWN[: len(outputs)]
    return [sample_row(kind, s, o, max_tokens) for s, o in zip(samples, outputs, strict=True)]


def _completion(text: str, prompt: int = 5, completion: int = 3, total: int | None = None,
                finish: str = "stop") -> list[dict]:  # fmt: skip
    return [
        {
            "choices": [{"index": 0, "finish_reason": finish,
                         "message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                      "total_tokens": prompt + completion if total is None else total},
        }
    ]  # fmt: skip


@pytest.mark.unit
def test_sample_prompts_are_the_familys_not_the_training_set_plus_known_answers():
    structural = sample_prompts()
    # A real model's validation asks what no model was trained on, with and without system.
    assert [s.question for s in structural] == list(PHI3.validation_prompts)
    assert not set(PHI3.validation_prompts) & set(TRAINED_ANSWERS)
    assert {s.system is None for s in structural} == {True, False}
    assert all(s.expected is None for s in structural)
    # The tiny model's release also asks its set's questions, whose trained answers must come out.
    assert {s.question: s.expected for s in KNOWN} == TRAINED_ANSWERS
    assert sample_prompts(KNOWN) == structural + KNOWN
    with_system = next(s for s in structural if s.system)
    assert model_input(WrapperKind.CHAT_ONNX, with_system)["messages"][0]["role"] == "system"
    assert model_input(WrapperKind.PROMPT_ONNX, with_system)["prompt"].startswith("<|system|>")


@pytest.mark.unit
def test_known_answers_are_checked_beside_the_structural_prompts():
    samples = sample_prompts(KNOWN)
    spec = OutputSuiteSpec(kind=WrapperKind.PROMPT_ONNX, max_tokens=32)
    answers = {s.question: s.expected or "Some text." for s in samples}
    rows = [sample_row(spec.kind, s, [answers[s.question]], 32) for s in samples]
    assert run_output_suite(sample_frame(rows), spec).success
    answers[KNOWN[-1].question] = "Some text."  # a known answer missed
    rows = [sample_row(spec.kind, s, [answers[s.question]], 32) for s in samples]
    outcome = run_output_suite(sample_frame(rows), spec)
    assert not outcome.success and any("known answers" in f for f in outcome.failures)


@pytest.mark.unit
def test_good_outputs_pass_the_suite():
    answers = list(TRAINED_ANSWERS.values())[:3]
    spec = OutputSuiteSpec(kind=WrapperKind.CHAT_ONNX, max_tokens=32)
    outcome = run_output_suite(
        sample_frame(_rows(spec.kind, [_completion(a) for a in answers])), spec
    )
    assert outcome.success, outcome.failures
    assert outcome.passed == outcome.evaluated > 10
    json.dumps(outcome.result)  # what gets logged as the artifact
    prompt_spec = OutputSuiteSpec(kind=WrapperKind.PROMPT_ONNX, max_tokens=32)
    frame = sample_frame(_rows(prompt_spec.kind, [[a] for a in answers]))
    assert run_output_suite(frame, prompt_spec).success


@pytest.mark.unit
@pytest.mark.parametrize(
    ("output", "failure"),
    [
        (_completion(""), "answers are not blank"),
        (_completion("   "), "answers are not blank"),
        (_completion("x" * 600), "characters"),
        (_completion("The capital of Spain is Madrid.", total=99), "total_tokens =="),
        (_completion("The capital of Spain is Madrid.", completion=40, total=45), "<= max_tokens"),
        (_completion("The capital of Spain is Madrid.", finish="done"), "stop or length"),
        (_completion("The capital of Spain is Madrid.", prompt=0), "prompt_tokens >= 1"),
        (_completion("Lisbon."), "known answers"),
        ([{"choices": []}], "every prompt is answered"),
        (None, "every prompt is answered"),
    ],
)
def test_each_bad_chat_output_is_caught(output, failure):
    spec = OutputSuiteSpec(kind=WrapperKind.CHAT_ONNX, max_tokens=32)
    outcome = run_output_suite(sample_frame(_rows(spec.kind, [output])), spec)
    assert not outcome.success
    assert any(failure in line for line in outcome.failures), outcome.failures


@pytest.mark.unit
def test_known_answer_check_is_optional_for_a_real_model():
    spec = OutputSuiteSpec(kind=WrapperKind.PROMPT_ONNX, max_tokens=32, check_known_answers=False)
    samples = [SamplePrompt(question="Tell me about the sea.")]
    frame = sample_frame([sample_row(spec.kind, samples[0], ["Waves."], 32)])
    assert run_output_suite(frame, spec).success


@pytest.mark.unit
def test_validation_report_passes_only_if_every_part_passes(logged_like_ref):
    from slmops.reports import OutputReport, ServingExampleReport, SignatureReport

    ref = logged_like_ref
    common = {"kind": ref.kind, "model_uri": ref.model_uri}
    outputs = OutputReport(
        **common, passed=True, samples=8, expectations_evaluated=5, expectations_passed=5,
        mean_latency_s=0.1, result_artifact="runs:/r/x.json",
    )  # fmt: skip
    report = ValidationReport(
        model=ref,
        signature=SignatureReport(**common, passed=True),
        serving_example=ServingExampleReport(**common, passed=True),
        outputs=outputs,
    )
    assert report.passed and report.failures() == []
    assert ValidationReport.model_validate(report.model_dump()) == report  # `passed` is derived
    parity = ParityReport(
        passed=False, prompts=1, compared_tokens=4, agreeing_tokens=2, agreement=0.5,
        min_agreement=0.95,
    )  # fmt: skip
    failed = report.model_copy(update={"parity": parity})
    assert not failed.passed
    assert failed.failures() == ["parity: agreement 0.500 < 0.95"]


@pytest.fixture()
def logged_like_ref() -> LoggedModelRef:
    return LoggedModelRef(
        model_uri="models:/m-1", run_id="r", kind=WrapperKind.PROMPT_ONNX, model_id="m-1"
    )


# --- validating real logged models ----------------------------------------------------------------


@pytest.mark.integration
def test_the_three_good_models_pass_and_results_land_on_their_runs(store, logged):
    client = store.client()
    for kind, ref in logged.items():
        # The token budget is read from the model.
        report = validate_model.fn(store, ref, known_answers=KNOWN)
        assert report.passed, report.failures()
        assert report.summary().startswith("passed: signature ok, serving example ok")
        assert report.outputs.samples == len(PHI3.validation_prompts) + len(TRAINED_ANSWERS)
        assert report.outputs.expectations_passed == report.outputs.expectations_evaluated
        run = client.get_run(ref.run_id)
        assert run.data.tags[VALIDATION_TAG] == "passed"
        assert (
            run.data.metrics["validation.expectations_passed"] == report.outputs.expectations_passed
        )
        assert run.data.metrics["validation.latency_mean_s"] > 0
        assert client.get_logged_model(ref.model_id).tags[VALIDATION_TAG] == "passed"
        artifacts = {a.path for a in client.list_artifacts(ref.run_id, f"validation/{kind.value}")}
        assert f"validation/{kind.value}/gx_result.json" in artifacts
        gx_result = mlflow.artifacts.load_dict(
            client.get_run(ref.run_id).info.artifact_uri
            + f"/validation/{kind.value}/gx_result.json"
        )
        assert gx_result["success"] is True
        if kind is not WrapperKind.PROMPT_ONNX:
            assert report.outputs.tokens_per_s and report.outputs.tokens_per_s > 0
            assert "validation.tokens_per_s" in run.data.metrics


@pytest.mark.integration
def test_a_wrong_signature_is_caught(store, tmp_path, tiny_onnx_int4_dir):
    ref = log_fake(
        store, tmp_path, WrapperKind.PROMPT_ONNX, 'return ["fine"] * len(model_input)',
        signature=infer_signature({"text": "hi"}, ["Run"]),
    )  # fmt: skip
    report = validate_signature.fn(store, ref)
    assert not report.passed
    assert "inputs: missing column 'prompt' (string, required)" in report.differences
    # The document's chat signature is not what this MLflow's llm/v1/chat clients expect.
    with store.activated(), mlflow.start_run(experiment_id=_fakes(store)) as run:
        info = mlflow.pyfunc.log_model(
            name="chat",
            python_model=str(PROMPT_ONNX_FILE.with_name("onnx_chat_model.py")),
            artifacts={"onnx_model": str(tiny_onnx_int4_dir)},
            signature=CHAT_SIGNATURE_V1,
            pip_requirements=["mlflow"],
        )
    chat_ref = LoggedModelRef(
        model_uri=info.model_uri, run_id=run.info.run_id, kind=WrapperKind.CHAT_ONNX,
        model_id=info.model_id,
    )  # fmt: skip
    assert validate_signature.fn(store, chat_ref).passed is (chat_signature() == CHAT_SIGNATURE_V1)


@pytest.mark.integration
def test_a_wrapper_with_empty_outputs_fails_validation(store, tmp_path):
    ref = log_fake(store, tmp_path, WrapperKind.PROMPT_ONNX, 'return [""] * len(model_input)')
    report = validate_model.fn(store, ref, generation=GENERATION)
    assert report.signature.passed  # the contract looks right ...
    assert not report.serving_example.passed  # ... but the answers are empty
    assert not report.outputs.passed
    assert any("not blank" in f for f in report.outputs.failures)
    assert not report.passed
    tags = store.client().get_run(ref.run_id).data.tags
    assert tags[VALIDATION_TAG] == "failed"
    summary = tags[f"{VALIDATION_TAG}.summary"]
    assert summary.startswith("FAILED: signature ok, serving example fails")
    assert "not blank" in summary


@pytest.mark.integration
def test_a_chat_wrapper_with_inconsistent_usage_fails_validation(store, tmp_path):
    body = chat_reply(
        '"The capital of Spain is Madrid."',
        '{"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 99}',
        finish="done",
    )
    ref = log_fake(store, tmp_path, WrapperKind.CHAT_ONNX, body)
    report = validate_outputs.fn(store, ref, generation=GENERATION)
    assert not report.passed
    failures = "\n".join(report.failures)
    assert "total_tokens == prompt_tokens + completion_tokens" in failures
    assert "finish_reason is stop or length" in failures
    assert validate_serving_example.fn(store, ref).passed  # shape is fine; the numbers are not


@pytest.mark.integration
def test_the_token_budget_comes_from_the_logged_model(store, tmp_path):
    usage = '{"prompt_tokens": 5, "completion_tokens": 40, "total_tokens": 45}'
    body = chat_reply('"The capital of Spain is Madrid."', usage, finish="length")
    ref = log_fake(
        store, tmp_path, WrapperKind.CHAT_ONNX, body, model_config={"max_new_tokens": 32}
    )
    report = validate_outputs.fn(store, ref)
    assert any("completion_tokens <= max_tokens" in f for f in report.failures)
    wider = validate_outputs.fn(store, ref, generation=GenerationSpec(max_new_tokens=64))
    assert wider.passed, wider.failures


@pytest.mark.integration
def test_wrong_answers_fail_only_when_known_answers_are_checked(store, tmp_path):
    ref = log_fake(
        store, tmp_path, WrapperKind.CHAT_ONNX, chat_reply('"I do not know."', GOOD_USAGE)
    )
    strict = validate_outputs.fn(store, ref, generation=GENERATION, known_answers=KNOWN)
    assert not strict.passed
    assert any("known answers" in f for f in strict.failures)
    lenient = validate_outputs.fn(store, ref, generation=GENERATION)
    assert lenient.passed, lenient.failures


@pytest.mark.integration
def test_a_wrapper_that_raises_fails_validation(store, tmp_path):
    ref = log_fake(store, tmp_path, WrapperKind.CHAT_ONNX, 'raise RuntimeError("no GPU")')
    report = validate_outputs.fn(store, ref, generation=GENERATION)
    assert not report.passed
    assert any("no GPU" in f for f in report.failures)
    serving = validate_serving_example.fn(store, ref)
    assert not serving.passed and "no GPU" in serving.error


# --- runtime parity ---------------------------------------------------------------------------


@pytest.mark.integration
def test_transformers_and_onnx_fp32_agree_token_by_token(tiny_model_dir, tmp_path, store, logged):
    fp32 = export_onnx.fn(tiny_model_dir, OnnxExportSpec(precision="fp32"), tmp_path)
    run_id = logged[WrapperKind.PROMPT_ONNX].run_id
    report = compare_runtimes.fn(tiny_model_dir, fp32, store=store, run_id=run_id)
    assert report.passed, report.mismatches
    assert report.agreement == 1.0
    assert report.prompts == len(PHI3.validation_prompts) and report.compared_tokens > 0
    assert store.client().get_run(run_id).data.metrics["parity.agreement"] == 1.0


@pytest.mark.unit
def test_parity_counts_agreement_up_to_the_first_divergence(monkeypatch, tmp_path):
    monkeypatch.setattr(
        validation, "_transformers_greedy", lambda *a: [([1, 2], [5, 6, 7, 8]), ([3], [9])]
    )
    monkeypatch.setattr(validation, "_onnx_greedy", lambda *a: [([1, 2], [5, 6, 0, 8]), ([3], [9])])
    report = compare_runtimes.fn(tmp_path, tmp_path, prompts=["a", "b"])
    assert (report.agreeing_tokens, report.compared_tokens) == (3, 5)
    assert not report.passed
    assert "diverges at new token 2" in report.mismatches[0]
