"""Evaluation sets: the items a promotion is judged on, shipped as JSON Lines in `slmops/evalsets/`.

One file per model family (`phi3.jsonl` for real Phi-3 models, `tiny-phi3.jsonl` for the
embedded tiny model, whose set is the questions it was trained on). One JSON object per line:

    {"id": "capital-france", "question": "What is the capital of France?",
     "check": {"kind": "contains", "any_of": ["Paris"]}}

with optional `system` (a system prompt), `max_tokens` and `reference` (a right answer, which
the check must accept: the shipped sets' tests score it). A stop-sequence item is asked with
`stop=[check.stop]`, which only the chat wrappers take, so the raw-prompt wrapper skips it.
Blank lines and lines starting with `#` are ignored. A malformed line is an `EvalSetError`
naming the file and line; loading checks every line before anything is evaluated.
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from slmops.config import WrapperKind
from slmops.families import PHI3, ChatFamily
from slmops.scorers import Check, StopSequenceCheck

BUILTIN_PACKAGE = "slmops.evalsets"


class EvalSetError(ValueError):
    """An evaluation set that cannot be used: missing, or a malformed item (file and line)."""


class EvalItem(BaseModel):
    """One question, and the check its answer must pass."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    question: str = Field(min_length=1)
    system: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    # A right answer, written by the set's author: documents what the check accepts.
    reference: str | None = None
    check: Check

    @property
    def stop(self) -> list[str] | None:
        return [self.check.stop] if isinstance(self.check, StopSequenceCheck) else None

    def applies_to(self, kind: WrapperKind) -> bool:
        """The raw-prompt wrapper takes no `stop` (nor `max_tokens`: it answers within its
        logged token budget)."""
        if kind is WrapperKind.PROMPT_ONNX:
            return self.stop is None
        return True

    def messages(self) -> list[dict[str, str]]:
        turns = [{"role": "system", "content": self.system}] if self.system else []
        return [*turns, {"role": "user", "content": self.question}]

    def request(self, kind: WrapperKind, family: ChatFamily = PHI3) -> dict[str, Any]:
        """What a model of `kind` is asked for this item."""
        if kind is WrapperKind.PROMPT_ONNX:
            return {"prompt": family.render(self.question, self.system)}
        body: dict[str, Any] = {"messages": self.messages()}
        if self.stop:
            body["stop"] = self.stop
        if self.max_tokens:
            body["max_tokens"] = self.max_tokens
        return body


class EvalSet(BaseModel):
    """A loaded evaluation set: its name, the digest of its file, and its items."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    digest: str  # sha256 of the file: a changed set is a different set
    items: tuple[EvalItem, ...]

    def for_kind(self, kind: WrapperKind) -> tuple[EvalItem, ...]:
        return tuple(item for item in self.items if item.applies_to(kind))


def builtin_eval_sets() -> list[str]:
    """The names of the sets that ship with slmops."""
    folder = resources.files(BUILTIN_PACKAGE)
    return sorted(
        p.name.removesuffix(".jsonl") for p in folder.iterdir() if p.name.endswith(".jsonl")
    )


def eval_set_path(name: str) -> Path:
    """The file of a shipped set (`phi3`), or `name` itself if it is a path to a .jsonl file."""
    if name.endswith(".jsonl"):
        return Path(name)
    if name not in builtin_eval_sets():
        raise EvalSetError(
            f"no evaluation set {name!r}: the shipped sets are {builtin_eval_sets()}, "
            "or give a path to a .jsonl file"
        )
    return Path(str(resources.files(BUILTIN_PACKAGE) / f"{name}.jsonl"))


def load_eval_set(name: str) -> EvalSet:
    """Load and validate a set by name or path; every malformed line is reported at once."""
    path = eval_set_path(name)
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise EvalSetError(f"cannot read evaluation set {path}: {error.strerror}") from error
    return parse_eval_set(raw.decode("utf-8"), source=str(path), name=Path(name).stem)


def parse_eval_set(text: str, source: str, name: str) -> EvalSet:
    """Items from JSON Lines `text`; `source` names the file in errors."""
    items: list[EvalItem] = []
    problems: list[str] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            item = EvalItem.model_validate(json.loads(line))
        except json.JSONDecodeError as error:
            problems.append(f"{source}:{number}: not JSON: {error.msg} (column {error.colno})")
            continue
        except ValidationError as error:
            details = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'item'}: {e['msg']}"
                for e in error.errors()
            )
            problems.append(f"{source}:{number}: {details}")
            continue
        if item.id in seen:
            problems.append(
                f"{source}:{number}: id {item.id!r} already used on line {seen[item.id]}"
            )
            continue
        seen[item.id] = number
        items.append(item)
    if not items and not problems:
        problems.append(f"{source}: no items")
    if problems:
        raise EvalSetError("malformed evaluation set:\n" + "\n".join(problems))
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return EvalSet(name=name, digest=digest, items=tuple(items))
