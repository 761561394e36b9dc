"""What validation found, as small frozen models; `ValidationReport.passed` gates promotion."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, computed_field, model_validator

from slmops.config import WrapperKind
from slmops.refs import LoggedModelRef


class _Report(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SignatureReport(_Report):
    """The logged signature against the one the wrapper kind must have."""

    kind: WrapperKind
    model_uri: str
    passed: bool
    differences: tuple[str, ...] = ()


class ServingExampleReport(_Report):
    """The kind's input example replayed the way `/invocations` would run it."""

    kind: WrapperKind
    model_uri: str
    passed: bool
    error: str | None = None
    output_preview: str | None = None


class OutputReport(_Report):
    """The fixed sample prompts predicted and checked by the great-expectations suite."""

    kind: WrapperKind
    model_uri: str
    passed: bool
    samples: int
    expectations_evaluated: int
    expectations_passed: int
    failures: tuple[str, ...] = ()
    mean_latency_s: float
    tokens_per_s: float | None = None  # None where the model reports no token usage
    result_artifact: str  # the GX result JSON, on the model's run


class ParityReport(_Report):
    """Greedy transformers against greedy onnxruntime-genai, token by token."""

    passed: bool
    prompts: int
    compared_tokens: int
    agreeing_tokens: int
    agreement: float
    min_agreement: float
    # Prompts the two tokenizers encoded differently: the runtimes were not given the same
    # input, so their agreement means nothing and parity fails whatever the rate.
    tokenizer_mismatches: int = 0
    mismatches: tuple[str, ...] = ()
    # What was compared: an fp32 export against transformers in fp32, or the int4 release
    # against transformers in the checkpoint's dtype (slmops.config.ParitySpec).
    onnx_precision: str = "fp32"
    reference_dtype: str = "float32"


class ValidationReport(_Report):
    """Everything validation checked for one logged model."""

    model: LoggedModelRef
    signature: SignatureReport
    serving_example: ServingExampleReport
    outputs: OutputReport
    parity: ParityReport | None = None

    @model_validator(mode="before")
    @classmethod
    def _drop_derived(cls, data: Any) -> Any:
        # `passed` is derived, never trusted from input: a dumped report validates back.
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if k != "passed"}
        return data

    @computed_field  # type: ignore[prop-decorator]
    @property
    def passed(self) -> bool:
        parts = [self.signature, self.serving_example, self.outputs, self.parity]
        return all(part.passed for part in parts if part is not None)

    def summary(self) -> str:
        """A verdict line, then one line per failed check (for tags and the UI)."""
        outputs = self.outputs
        parity = "n/a" if self.parity is None else f"{self.parity.agreement:.3f}"
        head = (
            f"{'passed' if self.passed else 'FAILED'}: "
            f"signature {'ok' if self.signature.passed else 'differs'}, "
            f"serving example {'ok' if self.serving_example.passed else 'fails'}, "
            f"outputs {outputs.expectations_passed}/{outputs.expectations_evaluated} "
            f"expectations on {outputs.samples} samples, parity {parity}"
        )
        return "\n".join([head, *self.failures()])

    def failures(self) -> list[str]:
        """One line per failed check, for logs and tags."""
        lines = [f"signature: {d}" for d in self.signature.differences]
        if not self.serving_example.passed:
            lines.append(f"serving example: {self.serving_example.error}")
        lines += [f"outputs: {f}" for f in self.outputs.failures]
        if self.parity is not None and not self.parity.passed:
            lines += [f"parity: {m}" for m in self.parity.mismatches] or [
                f"parity: agreement {self.parity.agreement:.3f} < {self.parity.min_agreement}"
            ]
        return lines


class WrapperOutcome(BaseModel):
    """What the release did with one wrapper."""

    model_config = ConfigDict(frozen=True)

    kind: WrapperKind
    registered_model: str
    model_uri: str
    version: int
    validation_passed: bool
    validation_summary: str
    promoted: bool
    production_version: int | None
    # The promotion gate's verdict (passed | failed | forced), None where it did not run
    # (validation failed, or the version already was the champion), and its rules.
    gate: str | None = None
    gate_summary: str = ""
    endpoint: str | None = None
    sample_answer: str | None = None


class ReleaseReport(BaseModel):
    model_config = ConfigDict(frozen=True)

    repo_id: str
    commit: str
    tracking_uri: str
    outcomes: tuple[WrapperOutcome, ...]

    @property
    def failed(self) -> list[WrapperOutcome]:
        return [o for o in self.outcomes if not o.validation_passed]

    @property
    def refused(self) -> list[WrapperOutcome]:
        """Validated versions the promotion gate kept out of Production."""
        return [o for o in self.outcomes if o.gate == "failed"]


def validation_row(name: str, report: ValidationReport) -> dict[str, object]:
    outputs = report.outputs
    return {
        "model": name,
        "model_uri": report.model.model_uri,
        "passed": report.passed,
        "signature": "ok" if report.signature.passed else "; ".join(report.signature.differences),
        "serving_example": "ok" if report.serving_example.passed else report.serving_example.error,
        "expectations": f"{outputs.expectations_passed}/{outputs.expectations_evaluated}",
        "samples": outputs.samples,
        "mean_latency_s": round(outputs.mean_latency_s, 4),
        "tokens_per_s": round(outputs.tokens_per_s, 1) if outputs.tokens_per_s else None,
        "runtime_parity": round(report.parity.agreement, 4) if report.parity else None,
        "failures": "; ".join(report.failures())[:500],
    }


def release_markdown(report: ReleaseReport) -> str:
    lines = [
        f"# Release of `{report.repo_id}` @ `{report.commit[:12]}`",
        "",
        "| model | version | validation | gate | promoted | Production | endpoint | sample answer |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for o in report.outcomes:
        lines.append(
            f"| {o.registered_model} | {o.version} | {'passed' if o.validation_passed else 'FAILED'} | "
            f"{o.gate or '-'} | "
            f"{'yes' if o.promoted else 'no'} | {o.production_version or '-'} | {o.endpoint or '-'} | "
            f"{(o.sample_answer or '-')[:80]} |"
        )
    lines += ["", f"Tracking store: `{report.tracking_uri}`"]
    return "\n".join(lines)
