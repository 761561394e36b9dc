"""The fixed sample prompts and the great-expectations suite their outputs must pass.

Validation predicts the sample prompts with a logged model, turns the outputs into one row per
sample (`sample_frame`), and checks the rows with `run_output_suite`: non-empty text of bounded
length, and for chat models a finish_reason in {stop, length} and consistent token usage. The
prompts are the model family's validation prompts (`slmops.families`), which no model was
trained on. Where a model is known to have learned the reference answers of its evaluation set
(the embedded tiny Phi-3, `ValidationSpec.reference_answers`), those questions are asked too
and their answers must come out (`known_answer_prompts`); that check is off for a real model.

great-expectations is imported inside functions: its import costs ~2 s.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from slmops.config import WrapperKind
from slmops.eval_sets import EvalSet
from slmops.families import PHI3, ChatFamily
from slmops.scorers import ExactCheck

if TYPE_CHECKING:
    import great_expectations as gx
    import pandas as pd

FINISH_REASONS = ("stop", "length")


class SamplePrompt(BaseModel):
    """One fixed validation prompt; `expected` is a text the answer must contain, if known."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    question: str
    system: str | None = None
    expected: str | None = None

    def messages(self) -> list[dict[str, str]]:
        turns = [{"role": "system", "content": self.system}] if self.system else []
        return [*turns, {"role": "user", "content": self.question}]

    def prompt(self, family: ChatFamily = PHI3) -> str:
        """The chat-template rendering, for the raw-prompt wrapper."""
        return family.render(self.question, self.system)


def sample_prompts(
    known_answers: Sequence[SamplePrompt] = (), family: ChatFamily = PHI3
) -> tuple[SamplePrompt, ...]:
    """The family's validation prompts, every other one with its validation system prompt, then
    the `known_answers` prompts (whose `expected` answers must come out).

    Args:
        known_answers: questions the model learned the answers of (`known_answer_prompts`).
        family: the model family.
    """
    structural = tuple(
        SamplePrompt(question=question, system=family.validation_system_prompt if i % 2 else None)
        for i, question in enumerate(family.validation_prompts)
    )
    return structural + tuple(known_answers)


def known_answer_prompts(eval_set: EvalSet) -> tuple[SamplePrompt, ...]:
    """The set's items with one reference answer (exact checks), as validation prompts that
    expect it: for a model trained on its set's answers, such as the embedded tiny Phi-3."""
    return tuple(
        SamplePrompt(question=item.question, system=item.system, expected=item.check.answer)
        for item in eval_set.items
        if isinstance(item.check, ExactCheck)
    )


class OutputSuiteSpec(BaseModel):
    """What the sample outputs of one model must satisfy."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: WrapperKind
    max_tokens: int = Field(ge=1)
    min_chars: int = Field(default=1, ge=0)
    # Generous: a token is rarely more than a dozen characters.
    chars_per_token: int = Field(default=16, ge=1)
    check_known_answers: bool = True

    @property
    def has_usage(self) -> bool:
        return self.kind is not WrapperKind.PROMPT_ONNX

    @property
    def max_chars(self) -> int:
        return self.max_tokens * self.chars_per_token


def model_input(kind: WrapperKind, sample: SamplePrompt) -> dict[str, Any]:
    """The request that asks a model of `kind` one sample prompt."""
    if kind is WrapperKind.PROMPT_ONNX:
        return {"prompt": sample.prompt()}
    return {"messages": sample.messages()}


def sample_row(
    kind: WrapperKind, sample: SamplePrompt, output: Any, max_tokens: int
) -> dict[str, Any]:
    """One row of the outputs frame from one prediction (a string or chat completion(s))."""
    row: dict[str, Any] = {
        "question": sample.question,
        "expected": sample.expected,
        "max_tokens": max_tokens,
        "text": None,
        "finish_reason": None,
        "prompt_tokens": None,
        "completion_tokens": None,
        "total_tokens": None,
    }
    if isinstance(output, list | tuple):
        output = output[0] if len(output) == 1 else None
    if kind is WrapperKind.PROMPT_ONNX:
        row["text"] = output if isinstance(output, str) else None
    elif isinstance(output, dict):
        choices = output.get("choices") or [{}]
        message = choices[0].get("message") or {}
        usage = output.get("usage") or {}
        row["text"] = message.get("content")
        row["finish_reason"] = choices[0].get("finish_reason")
        for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
            row[key] = usage.get(key)
    return row


def sample_frame(rows: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """The frame the suite runs on: the rows plus the derived columns it compares."""
    import pandas as pd

    frame = pd.DataFrame(list(rows))
    counts = ["prompt_tokens", "completion_tokens", "total_tokens"]
    frame[counts] = frame[counts].astype("Int64")
    frame["prompt_plus_completion"] = frame["prompt_tokens"] + frame["completion_tokens"]
    # From the rows, not the frame: a column of None and text reads None back as NaN.
    frame["answer_found"] = [
        None
        if row["expected"] is None
        else bool(isinstance(row["text"], str) and row["expected"] in row["text"])
        for row in rows
    ]
    frame["answer_found"] = frame["answer_found"].astype("object")
    return frame


def build_output_suite(spec: OutputSuiteSpec, rows: int) -> gx.ExpectationSuite:
    """The expectations over a frame of `rows` sample outputs from a model of `spec.kind`."""
    import great_expectations as gx
    import great_expectations.expectations as gxe

    expectations: list[Any] = [
        gxe.ExpectTableRowCountToEqual(value=rows, description="one output per sample prompt"),
        gxe.ExpectColumnValuesToNotBeNull(column="text", description="every prompt is answered"),
        gxe.ExpectColumnValuesToMatchRegex(
            column="text", regex=r"\S", description="answers are not blank"
        ),
        gxe.ExpectColumnValueLengthsToBeBetween(
            column="text",
            min_value=spec.min_chars,
            max_value=spec.max_chars,
            description=f"answers are {spec.min_chars}..{spec.max_chars} characters",
        ),
    ]
    if spec.has_usage:
        expectations += [
            gxe.ExpectColumnValuesToBeInSet(
                column="finish_reason",
                value_set=list(FINISH_REASONS),
                description="finish_reason is stop or length",
            ),
            gxe.ExpectColumnValuesToNotBeNull(
                column="finish_reason", description="finish_reason is set"
            ),
        ]
        for column in ("prompt_tokens", "completion_tokens", "total_tokens"):
            expectations += [
                gxe.ExpectColumnValuesToNotBeNull(column=column, description=f"{column} is set"),
                gxe.ExpectColumnValuesToBeBetween(
                    column=column, min_value=1, description=f"{column} >= 1"
                ),
            ]
        expectations += [
            gxe.ExpectColumnPairValuesToBeEqual(
                column_A="total_tokens",
                column_B="prompt_plus_completion",
                description="total_tokens == prompt_tokens + completion_tokens",
            ),
            gxe.ExpectColumnPairValuesAToBeGreaterThanB(
                column_A="max_tokens",
                column_B="completion_tokens",
                or_equal=True,
                description="completion_tokens <= max_tokens",
            ),
        ]
    if spec.check_known_answers:
        # Rows without a known answer hold None, which column-map expectations skip.
        expectations.append(
            gxe.ExpectColumnValuesToBeInSet(
                column="answer_found",
                value_set=[True],
                description="known answers come out",
            )
        )
    suite = gx.ExpectationSuite(name=f"sample-outputs-{spec.kind.value}")
    for expectation in expectations:
        suite.add_expectation(expectation)
    return suite


class SuiteOutcome(BaseModel):
    """A suite run, reduced to what a report needs, plus the full GX result as JSON."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    success: bool
    evaluated: int
    passed: int
    failures: tuple[str, ...]
    result: dict[str, Any]


def run_output_suite(frame: pd.DataFrame, spec: OutputSuiteSpec) -> SuiteOutcome:
    """Validate `frame` against the suite for `spec` in an ephemeral GX context (no files)."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    asset = context.data_sources.add_pandas("samples").add_dataframe_asset("outputs")
    batch = asset.add_batch_definition_whole_dataframe("all")
    suite = context.suites.add(build_output_suite(spec, rows=len(frame)))
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name=suite.name, data=batch, suite=suite)
    )
    result = definition.run(batch_parameters={"dataframe": frame})
    failures = []
    for item in result.results:
        if not item.success:
            config = item.expectation_config
            name = (config.description or config.type) if config else "expectation"
            sample = item.result.get("partial_unexpected_list") or item.result.get("observed_value")
            failures.append(f"{name}: unexpected {sample!r}")
    statistics = result.statistics
    return SuiteOutcome(
        success=bool(result.success),
        evaluated=int(statistics["evaluated_expectations"]),
        passed=int(statistics["successful_expectations"]),
        failures=tuple(failures),
        result=result.to_json_dict(),
    )
