"""Benchmark results: a summary of metrics with targets, written as JSON and a markdown table.

Every run of a part writes `benchmarks/results/<part>/<UTC timestamp>-<git short sha>.json`
and `.md`, and overwrites `latest.json` / `latest.md` beside them. The JSON records the commit
(and whether the tree had uncommitted changes), the machine and its load, so that two results
can be compared with `python -m benchmarks.compare`.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
_PACKAGES = ("torch", "transformers", "onnxruntime-genai", "onnxruntime", "mlflow", "prefect")


@dataclass(frozen=True)
class Metric:
    """One line of a summary table: a measured value and, where there is one, its target."""

    name: str
    value: float | int | str | None
    unit: str = ""
    target: str = ""  # e.g. "<= 0.15"; empty: informational
    met: bool | None = None  # None: no target, or not measurable this run
    note: str = ""


def check(value: float | None, op: str, bound: float) -> bool | None:
    """Whether `value op bound` holds; None when there is no value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return value <= bound if op == "<=" else value >= bound


@dataclass
class PartResult:
    """What one benchmark part measured."""

    part: str
    title: str
    metrics: list[Metric] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # extra md tables
    quick: bool = False
    started_at: str = field(default_factory=lambda: utc_now())
    wall_s: float = 0.0

    def add(self, *metrics: Metric) -> None:
        self.metrics.extend(metrics)


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def git_revision() -> dict[str, Any]:
    def git(*args: str) -> str:
        proc = subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=False
        )
        # rstrip only: a porcelain line starts with its status, " M" for a modified file.
        return proc.stdout.rstrip()

    changed = [
        line
        for line in git("status", "--porcelain").splitlines()
        if not line[3:].startswith("benchmarks/results")
    ]
    return {"sha": git("rev-parse", "--short", "HEAD") or "nogit", "dirty": bool(changed)}


def machine() -> dict[str, Any]:
    versions = {}
    for package in _PACKAGES:
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    return {
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "packages": versions,
    }


def median(values: Iterable[float]) -> float | None:
    data = list(values)
    return statistics.median(data) if data else None


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100), linear between closest ranks; None for no values."""
    data = sorted(values)
    if not data:
        return None
    rank = (len(data) - 1) * q / 100.0
    low, high = math.floor(rank), math.ceil(rank)
    return data[low] + (data[high] - data[low]) * (rank - low)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:.0f}"
        if value != 0 and abs(value) < 0.01:
            return f"{value:.3g}"
        return f"{value:.3f}".rstrip("0").rstrip(".") if abs(value) < 10 else f"{value:.1f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    if not rows:
        return "_(no rows)_"
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def metric_rows(metrics: Sequence[Metric], part: str | None = None) -> list[dict[str, Any]]:
    rows = []
    for m in metrics:
        row: dict[str, Any] = {"part": part} if part else {}
        verdict = {True: "met", False: "NOT met", None: ""}[m.met]
        row.update(
            metric=m.name, value=m.value, unit=m.unit, target=m.target, verdict=verdict, note=m.note
        )
        rows.append(row)
    return rows


def to_markdown(result: PartResult, revision: dict[str, Any], host: dict[str, Any]) -> str:
    dirty = " (uncommitted changes)" if revision["dirty"] else ""
    lines = [
        f"# {result.title}",
        "",
        f"commit `{revision['sha']}`{dirty}, {result.started_at}, "
        f"{'quick' if result.quick else 'full'} run, {result.wall_s:.0f} s; "
        f"{host['cpus']} CPUs, load {host['loadavg']}",
        "",
        markdown_table(metric_rows(result.metrics)),
    ]
    for name, rows in result.tables.items():
        lines += ["", f"## {name}", "", markdown_table(rows)]
    return "\n".join(lines) + "\n"


def _payload(result: PartResult) -> dict[str, Any]:
    return {
        "part": result.part,
        "title": result.title,
        "started_at": result.started_at,
        "wall_s": round(result.wall_s, 2),
        "quick": result.quick,
        "metrics": [asdict(m) for m in result.metrics],
        "tables": result.tables,
        "details": result.details,
    }


def _write(folder: Path, started_at: str, sha: str, payload: dict[str, Any], md: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{started_at.replace(':', '').replace('-', '')}-{sha}"
    text = json.dumps(payload, indent=2, default=str)
    for name in (stem, "latest"):
        (folder / f"{name}.json").write_text(text)
        (folder / f"{name}.md").write_text(md)
    return folder / f"{stem}.json"


def write_results(result: PartResult, results_dir: Path = RESULTS_DIR) -> Path:
    """Write one part's JSON and markdown (timestamped + latest); return the JSON path."""
    revision, host = git_revision(), machine()
    payload = {"git": revision, "machine": host, **_payload(result)}
    markdown = to_markdown(result, revision, host)
    return _write(results_dir / result.part, result.started_at, revision["sha"], payload, markdown)


def write_combined(
    results: Sequence[PartResult], started_at: str, wall_s: float, quick: bool,
    results_dir: Path = RESULTS_DIR,
) -> Path:  # fmt: skip
    """All parts of one `run_all` side by side: results/all/<stamp>-<sha>.json/.md + latest."""
    revision, host = git_revision(), machine()
    payload = {
        "part": "all",
        "git": revision,
        "started_at": started_at,
        "wall_s": round(wall_s, 2),
        "quick": quick,
        "machine": host,
        "parts": {r.part: _payload(r) for r in results},
    }
    dirty = " (uncommitted changes)" if revision["dirty"] else ""
    rows = [row for r in results for row in metric_rows(r.metrics, r.part)]
    lines = [
        "# slmops benchmarks",
        "",
        f"commit `{revision['sha']}`{dirty}, {started_at}, {'quick' if quick else 'full'} run, "
        f"{wall_s:.0f} s; {host['cpus']} CPUs, load {host['loadavg']}",
        "",
        markdown_table(rows),
    ]
    for r in results:
        for name, table in r.tables.items():
            lines += ["", f"## {r.part}: {name}", "", markdown_table(table)]
    return _write(
        results_dir / "all", started_at, revision["sha"], payload, "\n".join(lines) + "\n"
    )


class Stopwatch:
    """`with Stopwatch() as sw: ...` then `sw.s` holds the wall seconds."""

    def __enter__(self) -> Stopwatch:
        self._start = time.perf_counter()
        self.s = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.s = time.perf_counter() - self._start
