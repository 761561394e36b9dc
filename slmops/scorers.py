"""Code scorers for evaluation items: each check kind turns an answer into pass or fail (pure).

No model judges another: a check is a reference answer compared exactly or by containment, a
number read from the answer, or a format that code can verify (a word count, a list of N items,
a JSON object with given keys, a reply that ends at a stop sequence). Each check says which
scorer family it belongs to (`SCORER_OF`), so MLflow reports one mean per family next to the
aggregate.
"""

from __future__ import annotations

import json
import math
import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Check(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ExactCheck(_Check):
    """The answer equals `answer`, ignoring case, surrounding space and a final full stop."""

    kind: Literal["exact"] = "exact"
    answer: str = Field(min_length=1)


class ContainsCheck(_Check):
    """The answer contains one of `any_of` (case-insensitive)."""

    kind: Literal["contains"] = "contains"
    any_of: tuple[str, ...] = Field(min_length=1)


class NumericCheck(_Check):
    """The last number in the answer equals `value` within `tolerance` (models restate the
    question before answering, so the first number is often an operand)."""

    kind: Literal["numeric"] = "numeric"
    value: float
    tolerance: float = Field(default=0.0, ge=0.0)


class WordCountCheck(_Check):
    """The answer has between `min` and `max` words."""

    kind: Literal["word_count"] = "word_count"
    min: int = Field(ge=0)
    max: int = Field(ge=1)


class ListItemsCheck(_Check):
    """The answer is a list of exactly `count` items (bulleted or numbered lines)."""

    kind: Literal["list_items"] = "list_items"
    count: int = Field(ge=1)


class JsonKeysCheck(_Check):
    """The answer is a JSON object (a code fence around it is allowed) with exactly `keys`."""

    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)

    kind: Literal["json_keys"] = "json_keys"
    # `keys` in the set's files, not as an attribute: a model with a `keys` attribute looks
    # like a mapping to `dict(model)`, which Prefect calls on every task parameter (a release
    # with the phi3 set crashed in evaluate_model: "'tuple' object is not callable").
    json_keys: tuple[str, ...] = Field(alias="keys", min_length=1)


class StopSequenceCheck(_Check):
    """Asked with `stop=[stop]`, the answer starts with `prefix` and nothing follows the stop
    sequence (some runtimes keep the stop sequence itself, some drop it: both pass)."""

    kind: Literal["stop_sequence"] = "stop_sequence"
    stop: str = Field(min_length=1)
    prefix: str = Field(min_length=1)


Check = Annotated[
    ExactCheck
    | ContainsCheck
    | NumericCheck
    | WordCountCheck
    | ListItemsCheck
    | JsonKeysCheck
    | StopSequenceCheck,
    Field(discriminator="kind"),
]

# The scorer (an MLflow metric family) each check kind reports under.
SCORER_OF: dict[str, str] = {
    "exact": "exact_match",
    "contains": "contains",
    "numeric": "numeric_match",
    "word_count": "format_check",
    "list_items": "format_check",
    "json_keys": "format_check",
    "stop_sequence": "format_check",
}
SCORERS: tuple[str, ...] = tuple(dict.fromkeys(SCORER_OF.values()))


class Verdict(BaseModel):
    """One answer scored: pass or fail, and why."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    passed: bool
    rationale: str


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_LIST_LINE = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)])\s+\S")
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


def _normalized(text: str) -> str:
    return " ".join(text.split()).casefold().rstrip(".!").strip()


def numbers_in(text: str) -> list[float]:
    """The numbers written in `text`, in order ("1,024" is one number)."""
    found = []
    for token in _NUMBER.findall(text):
        try:
            found.append(float(token.replace(",", "")))
        except ValueError:  # a bare "," run cannot parse; the regex makes it rare
            continue
    return found


def score(check: Check, answer: str) -> Verdict:
    """Whether `answer` satisfies `check`."""
    if isinstance(check, ExactCheck):
        ok = _normalized(answer) == _normalized(check.answer)
        return Verdict(passed=ok, rationale=f"expected exactly {check.answer!r}")
    if isinstance(check, ContainsCheck):
        hits = [a for a in check.any_of if a.casefold() in answer.casefold()]
        return Verdict(passed=bool(hits), rationale=f"expected one of {list(check.any_of)}")
    if isinstance(check, NumericCheck):
        numbers = numbers_in(answer)
        if not numbers:
            return Verdict(
                passed=False, rationale=f"no number in the answer; expected {check.value:g}"
            )
        ok = math.isclose(numbers[-1], check.value, abs_tol=check.tolerance)
        return Verdict(
            passed=ok, rationale=f"last number {numbers[-1]:g}, expected {check.value:g}"
        )
    if isinstance(check, WordCountCheck):
        words = len(answer.split())
        ok = check.min <= words <= check.max
        return Verdict(passed=ok, rationale=f"{words} words, expected {check.min}..{check.max}")
    if isinstance(check, ListItemsCheck):
        items = sum(1 for line in answer.splitlines() if _LIST_LINE.match(line))
        ok = items == check.count
        return Verdict(passed=ok, rationale=f"{items} list items, expected {check.count}")
    if isinstance(check, JsonKeysCheck):
        return _score_json(check, answer)
    return _score_stop(check, answer)


def _score_json(check: JsonKeysCheck, answer: str) -> Verdict:
    text = answer.strip()
    fenced = _FENCE.match(text)
    try:
        value = json.loads(fenced.group(1) if fenced else text)
    except json.JSONDecodeError as error:
        return Verdict(passed=False, rationale=f"not JSON: {error.msg}")
    if not isinstance(value, dict):
        return Verdict(passed=False, rationale=f"JSON {type(value).__name__}, expected an object")
    ok = set(value) == set(check.json_keys)
    return Verdict(passed=ok, rationale=f"keys {sorted(value)}, expected {sorted(check.json_keys)}")


def _score_stop(check: StopSequenceCheck, answer: str) -> Verdict:
    text = answer.strip()
    if not text.startswith(check.prefix):
        return Verdict(passed=False, rationale=f"does not start with {check.prefix!r}")
    at = text.find(check.stop, len(check.prefix))
    if at >= 0 and text[at + len(check.stop) :].strip():
        return Verdict(passed=False, rationale=f"continues past the stop sequence {check.stop!r}")
    return Verdict(passed=True, rationale=f"ends at or before {check.stop!r}")
