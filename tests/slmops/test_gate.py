"""The promotion gate's pure parts: eval-set loading, code scorers, and the decision."""

from __future__ import annotations

import json
import math
import re

import pytest

from offline_kit.tiny_model import TRAINED_ANSWERS
from slmops.config import GateSpec, ReleaseConfig, WrapperKind
from slmops.eval_sets import EvalSetError, builtin_eval_sets, load_eval_set, parse_eval_set
from slmops.gate import (
    Evaluation,
    ItemResult,
    answer_agreement,
    changed_answers,
    decide,
    percentile,
)
from slmops.scorers import (
    SCORER_OF,
    ContainsCheck,
    ExactCheck,
    JsonKeysCheck,
    ListItemsCheck,
    NumericCheck,
    StopSequenceCheck,
    WordCountCheck,
    score,
)

pytestmark = pytest.mark.unit


# Eval sets


def test_shipped_sets_load_and_the_phi3_set_covers_every_check():
    assert {"phi3", "tiny-phi3"} <= set(builtin_eval_sets())
    phi3 = load_eval_set("phi3")
    assert 50 <= len(phi3.items) <= 100
    assert {item.check.kind for item in phi3.items} == set(SCORER_OF)
    # Stop sequences need a per-request `stop`: the raw-prompt wrapper gets the rest.
    prompt_items = phi3.for_kind(WrapperKind.PROMPT_ONNX)
    assert prompt_items and all(i.check.kind != "stop_sequence" for i in prompt_items)
    assert len(phi3.for_kind(WrapperKind.CHAT_ONNX)) == len(phi3.items)


def test_the_tiny_set_is_what_the_tiny_model_was_trained_on():
    tiny = load_eval_set("tiny-phi3")
    asked = [(i.question, i.check) for i in tiny.items]
    assert asked == [(q, ExactCheck(answer=a)) for q, a in TRAINED_ANSWERS.items()]


def _line(**overrides):
    item = {"id": "a", "question": "q?", "check": {"kind": "exact", "answer": "x"}}
    return json.dumps({**item, **overrides})


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("{not json", "not JSON"),
        (_line(check={"kind": "sarcasm"}), "check"),
        (_line(check={"kind": "numeric"}), "check.numeric.value: Field required"),
        (_line(question=""), "question"),
        (_line(colour="red"), "colour: Extra inputs are not permitted"),
        (_line(id="has space"), "id"),
    ],
)
def test_a_malformed_line_names_the_file_and_line(tmp_path, line, problem):
    path = tmp_path / "mine.jsonl"
    path.write_text("# a comment\n" + _line(id="ok") + "\n\n" + line + "\n")
    with pytest.raises(EvalSetError) as raised:
        load_eval_set(str(path))
    message = str(raised.value)
    assert f"{path}:4:" in message and problem in message


def test_every_malformed_line_is_reported_and_duplicates_are_caught():
    text = "\n".join([_line(id="a"), "[]", _line(id="a")])
    with pytest.raises(EvalSetError) as raised:
        parse_eval_set(text, source="s.jsonl", name="s")
    assert "s.jsonl:2:" in str(raised.value)
    assert "s.jsonl:3: id 'a' already used on line 1" in str(raised.value)


def test_an_unknown_set_name_lists_the_shipped_ones():
    with pytest.raises(EvalSetError, match=r"no evaluation set 'phi4'.*'phi3'"):
        load_eval_set("phi4")


def test_a_changed_set_has_another_digest():
    one = parse_eval_set(_line(), "x", "x")
    two = parse_eval_set(_line(question="other?"), "x", "x")
    assert one.digest != two.digest


# Scorers


@pytest.mark.parametrize(
    ("check", "answer", "passed"),
    [
        (ExactCheck(answer="The sky is blue."), "  the sky is blue ", True),
        (ExactCheck(answer="cold"), "cold, obviously", False),
        (ContainsCheck(any_of=("Paris",)), "It is paris.", True),
        (ContainsCheck(any_of=("H2O", "H\u2082O")), "Water is H\u2082O.", True),
        (ContainsCheck(any_of=("Paris",)), "Lyon", False),
        (NumericCheck(value=84), "12 times 7 is 84.", True),
        (NumericCheck(value=5555), "1234 + 4321 = 5,555", True),
        (NumericCheck(value=-25), "15 - 40 = -25", True),
        (NumericCheck(value=84), "84, or maybe 85", False),
        (NumericCheck(value=1), "one", False),
        (WordCountCheck(min=5, max=5), "Vast blue deep salty restless", True),
        (WordCountCheck(min=5, max=5), "Vast blue deep", False),
        (ListItemsCheck(count=3), "- apple\n- pear\n- plum", True),
        (ListItemsCheck(count=3), "1. apple\n2) pear\n3. plum\nEnjoy!", True),
        (ListItemsCheck(count=3), "apple, pear, plum", False),
        (JsonKeysCheck(keys=("name", "age")), '```json\n{"name": "A", "age": 3}\n```', True),
        (JsonKeysCheck(keys=("name", "age")), '{"name": "A"}', False),
        (JsonKeysCheck(keys=("name",)), '["name"]', False),
        (JsonKeysCheck(keys=("name",)), "name: A", False),
        (StopSequenceCheck(stop=", 5", prefix="1, 2, 3, 4"), "1, 2, 3, 4", True),
        (StopSequenceCheck(stop=", 5", prefix="1, 2, 3, 4"), "1, 2, 3, 4, 5", True),
        (StopSequenceCheck(stop=", 5", prefix="1, 2, 3, 4"), "1, 2, 3, 4, 5, 6, 7", False),
        (StopSequenceCheck(stop=", 5", prefix="1, 2, 3, 4"), "Sure! 1, 2, 3, 4", False),
    ],
)
def test_scorers(check, answer, passed):
    verdict = score(check, answer)
    assert verdict.passed is passed, verdict.rationale


# The Phi-3 set (its gate floor is 0.7): every item is scorable by code, its reference answer
# passes, and a plausible wrong answer (a near miss, a restated question, a format slip) fails.
# Wrong because the fact, number or format is off: what a weak or broken build answers.
PHI3_WRONG_ANSWERS = {
    "capital-france": "The capital of France is Lyon.",
    "capital-japan": "The capital of Japan is Kyoto.",
    "capital-australia": "The capital of Australia is Sydney.",
    "capital-canada": "The capital of Canada is Toronto.",
    "capital-kenya": "The capital of Kenya is Mombasa.",
    "largest-planet": "Saturn is the largest planet in our solar system.",
    "red-planet": "Venus is known as the Red Planet.",
    "water-formula": "The chemical formula of water is CO2.",
    "gold-symbol": "The chemical symbol for gold is Ag, because of its Latin name.",
    "romeo-author": "Christopher Marlowe wrote Romeo and Juliet.",
    "relativity": "Isaac Newton developed the theory of general relativity.",
    "longest-river-africa": "The Congo is the longest river in Africa.",
    "largest-ocean": "The Atlantic Ocean is the largest ocean on Earth.",
    "freezing-point": "Water freezes at 32",
    "speed-light-unit": "Metres.",
    "mona-lisa": "Michelangelo painted the Mona Lisa.",
    "dna-shape": "The DNA molecule is usually called a single strand.",
    "photosynthesis-gas": "Plants take in oxygen for photosynthesis.",
    "python-creator": "Dennis Ritchie created Python.",
    "http-port": "HTTPS uses port 80 by default.",
    "opposite-hot": "The opposite of hot is cold.",
    "color-grass": "Grass is green.",
    "yes-no-sun-star": "no",
    "yes-no-fish-mammal": "yes",
    "plural-mouse": "mouses",
    "add-small": "17 + 25 = 43",
    "add-large": "1234 + 4321 = 5565",
    "sub": "100 - 37 = 73",
    "sub-negative": "15 - 40 = 25",
    "mul-small": "12 times 7 is 74",
    "mul-large": "25 multiplied by 16 is 375",
    "div": "144 divided by 12 is 14",
    "square": "9 squared is 18",
    "sqrt": "The square root of 169 is 14",
    "percent": "20 percent of 150 is 20",
    "half": "Half of 86 is 42",
    "minutes-hours": "3 hours have 3 * 60 minutes",
    "days-weeks": "5 weeks have 5 * 7",
    "word-problem-apples": "8 + 5 = 13",
    "word-problem-price": "4 + 12 = 16",
    "words-five-ocean": "The ocean is vast, deep and blue.",
    "words-three-coffee": "Coffee is hot and bitter.",
    "words-under-ten": "A compiler translates the source code that programmers write into machine code.",
    "words-one-sentence-sky": "The sky is blue because molecules in the air scatter the short blue wavelengths of sunlight more than the longer red ones.",
    "words-two-greeting": "Hello!",
    "list-three-fruits": "- Apple\n- Banana",
    "list-four-colors": "Red, green, blue and yellow.",
    "list-five-animals": "- Cat\n- Dog\n- Horse\n- Cow\n- Sheep\n- Goat",
    "list-two-languages": "Python and Rust.",
    "list-three-planets": "1. Mercury\n2. Venus",
    "json-person": '{"name": "Ada"}',
    "json-city": "city: Paris, country: France",
    "json-book": '["Dune", "Frank Herbert", 1965]',
    "json-point": '{"x": 3, "y": 4, "z": 0}',
    "json-status": '{"ok": true, "error": null}',
    "stop-count-ten": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10",
    "stop-alphabet": "A B C D E F G H I J",
    "stop-weekdays": "Monday, Tuesday, Wednesday, Thursday, Friday",
    "stop-even": "2, 4, 6, 8, 10, 12",
    "stop-months": "January, February, March, April, May, June",
}

# Arithmetic questions of the set, and what they compute: the set's numbers are checked too.
_ARITHMETIC = {
    r"What is (\d+) \+ (\d+)\?": lambda a, b: a + b,
    r"What is (\d+) - (\d+)\?": lambda a, b: a - b,
    r"What is (\d+) (?:times|multiplied by) (\d+)\?": lambda a, b: a * b,
    r"What is (\d+) divided by (\d+)\?": lambda a, b: a / b,
    r"What is (\d+) percent of (\d+)\?": lambda a, b: a * b / 100,
    r"What is (\d+) squared\?": lambda a: a * a,
    r"What is the square root of (\d+)\?": lambda a: math.sqrt(a),
    r"What is half of (\d+)\?": lambda a: a / 2,
}


def test_every_phi3_item_accepts_its_reference_and_rejects_a_plausible_wrong_answer():
    phi3 = load_eval_set("phi3")
    assert set(PHI3_WRONG_ANSWERS) == {item.id for item in phi3.items}
    for item in phi3.items:
        assert item.check.kind in SCORER_OF, item.id  # a code scorer, no model as judge
        assert item.reference is not None, f"{item.id}: no reference answer"
        right, wrong = (
            score(item.check, item.reference),
            score(item.check, PHI3_WRONG_ANSWERS[item.id]),
        )
        assert right.passed, f"{item.id}: reference {item.reference!r} fails: {right.rationale}"
        assert not wrong.passed, f"{item.id}: {PHI3_WRONG_ANSWERS[item.id]!r} passes"


def test_the_phi3_sets_arithmetic_is_right():
    computed = 0
    for item in load_eval_set("phi3").items:
        for pattern, compute in _ARITHMETIC.items():
            if found := re.match(pattern, item.question):
                assert isinstance(item.check, NumericCheck), item.id
                assert item.check.value == compute(*map(int, found.groups())), item.id
                computed += 1
    assert computed == 11


def test_the_phi3_references_score_1_and_the_wrong_answers_0_through_the_mlflow_scorers():
    from tasks.evaluation import mlflow_scorers

    phi3 = load_eval_set("phi3")
    for answers, expected in ((None, True), (PHI3_WRONG_ANSWERS, False)):
        values: dict[str, list[bool]] = {}
        for item in phi3.items:
            outputs = item.reference if answers is None else answers[item.id]
            expectations = {"check": item.check.model_dump(mode="json")}
            for scorer in mlflow_scorers():
                feedback = scorer(outputs=outputs, expectations=expectations)
                if feedback is not None:
                    values.setdefault(scorer.name, []).append(feedback.value)
        # Every family scores its own items, each item once: the means MLflow reports.
        assert set(values) == set(SCORER_OF.values())
        assert sum(map(len, values.values())) == len(phi3.items)
        assert all(value is expected for family in values.values() for value in family)


# The decision


def _evaluation(passed=10, items=10, p95=1.0, rss=None, digest="d" * 64) -> Evaluation:
    return Evaluation(
        eval_set="s", eval_set_digest=digest, model_uri="models:/m-1", items=items,
        passed=passed, latency_p95_s=p95, peak_rss_mb=rss,
    )  # fmt: skip


SPEC = GateSpec(
    min_score=0.5,
    score_tolerance=0.1,
    latency_tolerance=0.2,
    latency_slack_s=0.0,
    rss_tolerance=0.1,
)


def _by_metric(decision):
    return {check.metric: check for check in decision.checks}


def test_a_first_release_is_judged_on_the_floor_alone():
    passing = decide(_evaluation(passed=5, p95=99.0), None, SPEC)
    assert passing.passed and passing.promote and passing.champion_version is None
    checks = _by_metric(passing)
    assert checks["score_floor"].passed and checks["score_floor"].threshold == 0.5
    for metric in ("score_vs_champion", "latency_p95_s", "peak_rss_mb"):
        assert checks[metric].passed is None and checks[metric].skipped == "no champion"
    failing = decide(_evaluation(passed=4), None, SPEC)
    assert not failing.passed and not failing.promote
    assert [c.metric for c in failing.failures] == ["score_floor"]
    assert "score_floor: 0.4, needs >= 0.5: FAILED" in failing.summary()


def test_an_equal_or_better_challenger_passes():
    champion = _evaluation(passed=8, p95=1.0, rss=1000.0)
    for challenger in (_evaluation(passed=8, p95=1.0, rss=1000.0), _evaluation(passed=10, p95=0.5)):
        decision = decide(challenger, champion, SPEC, champion_version=3)
        assert decision.passed and decision.verdict == "passed"


@pytest.mark.parametrize(
    ("challenger", "metric", "line"),
    [
        (
            _evaluation(passed=6),
            "score_vs_champion",
            "score_vs_champion: 0.6, needs >= 0.7 (champion 0.8): FAILED",
        ),
        (
            _evaluation(passed=8, p95=1.21),
            "latency_p95_s",
            "latency_p95_s: 1.21, needs <= 1.2 (champion 1): FAILED",
        ),
        (
            _evaluation(passed=8, rss=1101.0),
            "peak_rss_mb",
            "peak_rss_mb: 1101, needs <= 1100 (champion 1000): FAILED",
        ),
    ],
)
def test_a_worse_challenger_fails_on_the_rule_it_breaks(challenger, metric, line):
    champion = _evaluation(passed=8, p95=1.0, rss=1000.0)
    decision = decide(challenger, champion, SPEC, champion_version=3)
    assert [c.metric for c in decision.failures] == [metric]
    assert line in decision.summary() and not decision.promote


def test_within_tolerance_passes_and_slack_absorbs_noise():
    champion = _evaluation(passed=8, p95=0.1, rss=1000.0)
    within = _evaluation(passed=7, p95=0.12, rss=1100.0)
    assert decide(within, champion, SPEC).passed  # 0.7 >= 0.8 - 0.1, 0.12 <= 0.1 * 1.2
    noisy = _evaluation(passed=8, p95=0.6)
    assert not decide(noisy, champion, SPEC).passed
    assert decide(noisy, champion, SPEC.model_copy(update={"latency_slack_s": 0.5})).passed


def test_memory_is_checked_only_where_both_were_measured():
    checks = _by_metric(decide(_evaluation(rss=5000.0), _evaluation(rss=None), SPEC))
    assert checks["peak_rss_mb"].passed is None
    assert checks["peak_rss_mb"].skipped == "memory not measured for both"


def test_forcing_promotes_past_a_failed_gate_and_says_so():
    decision = decide(_evaluation(passed=1), _evaluation(), SPEC, champion_version=1, force=True)
    assert not decision.passed and decision.promote and decision.verdict == "forced"
    assert decision.summary().startswith("gate forced against champion v1")


def test_evaluations_on_different_sets_do_not_compare():
    with pytest.raises(ValueError, match="evaluated on"):
        decide(_evaluation(digest="a" * 64), _evaluation(digest="b" * 64), SPEC)


def test_p95_is_an_observed_value():
    assert percentile([0.1, 0.2, 0.3, 0.9], 95) == 0.9
    assert percentile(list(range(1, 101)), 95) == 95


def test_changed_answers_lists_only_items_that_changed():
    def result(item, answer, passed):
        return ItemResult(
            id=item, question="q", answer=answer, passed=passed, scorer="exact_match",
            rationale="", latency_s=0.1,
        )  # fmt: skip

    champion = [result("a", "Madrid", True), result("b", "Rome", True), result("c", "x", False)]
    challenger = [result("a", "Madrid", True), result("b", "Paris", False), result("c", "y", True)]
    rows = changed_answers(champion, challenger)
    assert [(r["item"], r["change"]) for r in rows] == [("b", "broken"), ("c", "fixed")]


def test_answer_agreement_counts_the_items_both_answered():
    def result(item, answer):
        return ItemResult(
            id=item, question="q", answer=answer, passed=True, scorer="contains",
            rationale="", latency_s=0.1,
        )  # fmt: skip

    reference = [result("a", "Madrid"), result("b", "Rome"), result("c", None), result("d", "x")]
    onnx = [result("a", "Madrid "), result("b", "Paris"), result("c", "y")]
    assert answer_agreement(reference, onnx) == 0.5  # a and b compared; c unanswered; d not asked
    assert answer_agreement(reference, []) is None


# Configuration


def test_promote_keeps_true_and_false_and_force_needs_a_reason():
    assert ReleaseConfig.model_validate({"promote": True}).promote is True
    assert ReleaseConfig.model_validate({"promote": False}).promote is False
    forced = ReleaseConfig.model_validate({"promote": "force", "promote_reason": "hotfix, by ops"})
    assert forced.force_promotion
    with pytest.raises(ValueError, match="promote_reason"):
        ReleaseConfig.model_validate({"promote": "force"})
    with pytest.raises(ValueError, match="promote"):
        ReleaseConfig.model_validate({"promote": "maybe"})
