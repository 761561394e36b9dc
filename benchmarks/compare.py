"""Compare two benchmark results, metric by metric (e.g. the same part on two commits).

    python -m benchmarks.compare OLD.json [NEW.json]

Either file may be one part's result or a `run_all` result (results/all/...). NEW defaults to
`latest.json` beside OLD. Prints a markdown table: old value, new value, change, and the new
verdict against the target. Numbers only mean something between runs on the same machine under
similar load (each file records the machine and its load average).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from benchmarks.recording import markdown_table


def metrics_of(path: Path) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """`part: metric name` -> metric, and the run's header (commit, time, load)."""
    data = json.loads(path.read_text())
    parts = data["parts"].values() if "parts" in data else [data]
    found = {}
    for part in parts:
        for metric in part["metrics"]:
            found[f"{part['part']}: {metric['name']}"] = metric
    header = {
        "file": str(path),
        "commit": data["git"]["sha"] + ("+" if data["git"]["dirty"] else ""),
        "started_at": data["started_at"],
        "quick": data.get("quick"),
        "load": data["machine"]["loadavg"],
    }
    return found, header


def _change(old: Any, new: Any) -> str:
    if isinstance(old, int | float) and isinstance(new, int | float) and old:
        return f"{100 * (new - old) / abs(old):+.1f}%"
    return "" if old == new else "changed"


def compare(old_path: Path, new_path: Path) -> str:
    old, old_header = metrics_of(old_path)
    new, new_header = metrics_of(new_path)
    rows = []
    for name in list(old) + [n for n in new if n not in old]:
        a, b = old.get(name, {}), new.get(name, {})
        verdict = {True: "met", False: "NOT met", None: ""}[b.get("met")]
        rows.append(
            {
                "metric": name,
                "old": a.get("value"),
                "new": b.get("value"),
                "unit": b.get("unit", a.get("unit", "")),
                "change": _change(a.get("value"), b.get("value")),
                "target": b.get("target", a.get("target", "")),
                "new verdict": verdict,
            }
        )
    return "\n".join(
        [
            "# Benchmark comparison",
            "",
            markdown_table([{"": "old", **old_header}, {"": "new", **new_header}]),
            "",
            markdown_table(rows),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path, nargs="?")
    args = parser.parse_args()
    print(compare(args.old, args.new or args.old.parent / "latest.json"))


if __name__ == "__main__":
    main()
