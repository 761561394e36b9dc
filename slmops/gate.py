"""The promotion gate (pure): an evaluation's results, and the decision whether a challenger may
replace the champion.

`decide` compares the challenger's `Evaluation` with the champion's (None on a first release)
under a `GateSpec`, and returns one `GateCheck` per rule with the value, the champion's value,
the threshold and the verdict:

- score >= `min_score`;
- score >= champion's score - `score_tolerance`;
- p95 latency <= champion's * (1 + `latency_tolerance`) + `latency_slack_s`;
- peak RSS <= champion's * (1 + `rss_tolerance`), where both were measured.

A first release is judged on the floor alone. `promote: force` promotes past failed checks; the
decision then says so, and the caller audits it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from slmops.config import GateSpec


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ItemResult(_Frozen):
    """One evaluation item answered and scored."""

    id: str
    question: str
    answer: str | None  # None: the model raised instead of answering
    passed: bool
    scorer: str
    rationale: str
    latency_s: float


class Evaluation(_Frozen):
    """A model's results on one evaluation set (its items live in `items_artifact`)."""

    eval_set: str
    eval_set_digest: str
    model_uri: str
    items: int = Field(ge=1)
    passed: int = Field(ge=0)
    latency_p95_s: float = Field(ge=0.0)
    peak_rss_mb: float | None = None  # None: not measured (in-process evaluation)
    items_artifact: str = ""  # runs:/<run>/<path> of the per-item results

    @property
    def score(self) -> float:
        return self.passed / self.items


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by the nearest-rank method: an observed value, never an
    interpolation between two."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def summarize(
    results: Sequence[ItemResult],
    eval_set: str,
    eval_set_digest: str,
    model_uri: str,
    peak_rss_mb: float | None = None,
    items_artifact: str = "",
) -> Evaluation:
    """The aggregate of per-item results."""
    return Evaluation(
        eval_set=eval_set,
        eval_set_digest=eval_set_digest,
        model_uri=model_uri,
        items=len(results),
        passed=sum(r.passed for r in results),
        latency_p95_s=percentile([r.latency_s for r in results], 95),
        peak_rss_mb=peak_rss_mb,
        items_artifact=items_artifact,
    )


Metric = Literal["score_floor", "score_vs_champion", "latency_p95_s", "peak_rss_mb"]


class GateCheck(_Frozen):
    """One rule of the gate: the challenger's value against a threshold."""

    metric: Metric
    value: float | None
    champion: float | None
    threshold: float | None
    comparison: Literal[">=", "<="]
    # None: not checked (no champion, or not measured); `skipped` says why.
    passed: bool | None
    skipped: str | None = None

    def describe(self) -> str:
        if self.passed is None:
            return f"{self.metric}: not checked ({self.skipped})"
        against = "" if self.champion is None else f" (champion {self.champion:.4g})"
        verdict = "ok" if self.passed else "FAILED"
        return (
            f"{self.metric}: {self.value:.4g}, needs {self.comparison} {self.threshold:.4g}"
            f"{against}: {verdict}"
        )


class GateDecision(_Frozen):
    """What the gate decided for one challenger, and on what evidence."""

    checks: tuple[GateCheck, ...]
    champion_version: int | None
    forced: bool = False

    @property
    def passed(self) -> bool:
        return all(check.passed is not False for check in self.checks)

    @property
    def promote(self) -> bool:
        return self.passed or self.forced

    @property
    def failures(self) -> tuple[GateCheck, ...]:
        return tuple(check for check in self.checks if check.passed is False)

    @property
    def verdict(self) -> Literal["passed", "failed", "forced"]:
        if self.passed:
            return "passed"
        return "forced" if self.forced else "failed"

    def summary(self) -> str:
        """A verdict line, then one line per rule."""
        against = (
            f"champion v{self.champion_version}"
            if self.champion_version is not None
            else "no champion (floor only)"
        )
        head = f"gate {self.verdict} against {against}"
        return "\n".join([head, *(check.describe() for check in self.checks)])


def _at_least(metric: Metric, value: float, threshold: float, champion: float | None) -> GateCheck:
    return GateCheck(
        metric=metric,
        value=value,
        champion=champion,
        threshold=threshold,
        comparison=">=",
        passed=value >= threshold - 1e-12,  # scores are ratios: no float-noise refusals
    )


def _at_most(metric: Metric, value: float, threshold: float, champion: float) -> GateCheck:
    return GateCheck(
        metric=metric,
        value=value,
        champion=champion,
        threshold=threshold,
        comparison="<=",
        passed=value <= threshold,
    )


def _skipped(metric: Metric, value: float | None, comparison: Literal[">=", "<="], why: str):
    return GateCheck(
        metric=metric,
        value=value,
        champion=None,
        threshold=None,
        comparison=comparison,
        passed=None,
        skipped=why,
    )


def decide(
    challenger: Evaluation,
    champion: Evaluation | None,
    spec: GateSpec,
    champion_version: int | None = None,
    force: bool = False,
) -> GateDecision:
    """The gate's decision for `challenger` against `champion` (None: a first release).

    Raises:
        ValueError: the two were evaluated on different sets: their scores do not compare.
    """
    checks = [_at_least("score_floor", challenger.score, spec.min_score, None)]
    if champion is None:
        checks += [
            _skipped("score_vs_champion", challenger.score, ">=", "no champion"),
            _skipped("latency_p95_s", challenger.latency_p95_s, "<=", "no champion"),
            _skipped("peak_rss_mb", challenger.peak_rss_mb, "<=", "no champion"),
        ]
        return GateDecision(checks=tuple(checks), champion_version=None, forced=force)
    if champion.eval_set_digest != challenger.eval_set_digest:
        raise ValueError(
            f"the champion was evaluated on {champion.eval_set} ({champion.eval_set_digest[:12]}), "
            f"the challenger on {challenger.eval_set} ({challenger.eval_set_digest[:12]})"
        )
    checks.append(
        _at_least(
            "score_vs_champion",
            challenger.score,
            champion.score - spec.score_tolerance,
            champion.score,
        )
    )
    latency_limit = champion.latency_p95_s * (1 + spec.latency_tolerance) + spec.latency_slack_s
    checks.append(
        _at_most("latency_p95_s", challenger.latency_p95_s, latency_limit, champion.latency_p95_s)
    )
    if challenger.peak_rss_mb is None or champion.peak_rss_mb is None:
        checks.append(
            _skipped("peak_rss_mb", challenger.peak_rss_mb, "<=", "memory not measured for both")
        )
    else:
        rss_limit = champion.peak_rss_mb * (1 + spec.rss_tolerance)
        checks.append(
            _at_most("peak_rss_mb", challenger.peak_rss_mb, rss_limit, champion.peak_rss_mb)
        )
    return GateDecision(checks=tuple(checks), champion_version=champion_version, forced=force)


def changed_answers(
    champion: Sequence[ItemResult], challenger: Sequence[ItemResult]
) -> list[dict[str, object]]:
    """Rows for the items whose answer differs between champion and challenger."""
    before = {r.id: r for r in champion}
    rows: list[dict[str, object]] = []
    for after in challenger:
        old = before.get(after.id)
        if old is None or old.answer == after.answer:
            continue
        rows.append(
            {
                "item": after.id,
                "question": after.question,
                "champion_answer": old.answer,
                "champion_passed": old.passed,
                "challenger_answer": after.answer,
                "challenger_passed": after.passed,
                "change": _change(old.passed, after.passed),
            }
        )
    return rows


def _change(before: bool, after: bool) -> str:
    if before == after:
        return "same verdict"
    return "fixed" if after else "broken"


def answer_agreement(reference: Sequence[ItemResult], other: Sequence[ItemResult]) -> float | None:
    """The share of the items both answered on which `other` gives the same answer as
    `reference` (e.g. the int4 ONNX wrapper against the transformers one); None if none shared."""
    answers = {r.id: r.answer for r in reference if r.answer is not None}
    shared = [r for r in other if r.id in answers and r.answer is not None]
    if not shared:
        return None
    same = sum((r.answer or "").strip() == (answers[r.id] or "").strip() for r in shared)
    return same / len(shared)
