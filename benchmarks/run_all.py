"""Run every benchmark part in one go and write them side by side.

Order: (c) runtime latency and (d) logging cost first (no servers running), then (a) the
release runs, whose served models (b) and (e) reuse, as they do the mid-size model served
once for both. Every part writes its own results; the combined table goes to
`benchmarks/results/all/<UTC timestamp>-<sha>.json/.md` and `latest.json/.md`. All servers
are stopped at the end, also on failure.

    python -m benchmarks.run_all [--quick] [--only a,b,c,d,e]
"""

from __future__ import annotations

import argparse
import contextlib
import time
import traceback
from collections.abc import Callable

from benchmarks import (
    concurrency,
    logging_cost,
    release_rerun,
    runtime_latency,
    serving_overhead,
)
from benchmarks.recording import Metric, PartResult, utc_now, write_combined, write_results
from benchmarks.served import ServedModel, release_models, serving_midsize

PARTS = {
    "a": "release_rerun",
    "b": "serving_overhead",
    "c": "runtime_latency",
    "d": "logging_cost",
    "e": "concurrency",
}


def _failed(part: str, error: BaseException) -> PartResult:
    result = PartResult(part, f"{part} (failed)")
    result.add(Metric("error", f"{type(error).__name__}: {error}"[:300], met=False))
    result.details["traceback"] = traceback.format_exc()
    return result


def run_all(quick: bool, only: set[str]) -> list[PartResult]:
    results: list[PartResult] = []

    def attempt(letter: str, call: Callable[[], PartResult]) -> None:
        if letter not in only:
            return
        print(f"== ({letter}) {PARTS[letter]}", flush=True)
        try:
            result = call()
        except Exception as error:  # one failing part must not hide the others' figures
            result = _failed(PARTS[letter], error)
        write_results(result)
        results.append(result)

    attempt("c", lambda: runtime_latency.run(quick=quick))
    attempt("d", lambda: logging_cost.run(quick=quick))
    with contextlib.ExitStack() as stack:
        release: list[ServedModel] | None = None
        if "a" in only:
            print("== (a) release_rerun", flush=True)
            try:
                result, sandbox = release_rerun.run_keeping_servers(quick=quick)
                stack.callback(sandbox.close)
                release = release_models(sandbox)
            except Exception as error:
                result = _failed(PARTS["a"], error)
            write_results(result)
            results.append(result)
        midsize: list[ServedModel] | None = None
        if not quick and only & {"b", "e"}:
            midsize = stack.enter_context(serving_midsize())
        attempt("b", lambda: serving_overhead.run(quick=quick, release=release, midsize=midsize))
        attempt("e", lambda: concurrency.run(quick=quick, release=release, midsize=midsize))
    return sorted(results, key=lambda r: list(PARTS.values()).index(r.part))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run of every part")
    parser.add_argument("--only", default="a,b,c,d,e", help="parts to run (default all)")
    args = parser.parse_args()
    only = {p.strip() for p in args.only.split(",") if p.strip()}
    unknown = only - set(PARTS)
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}; choose from {','.join(PARTS)}")
    started, t0 = utc_now(), time.perf_counter()
    results = run_all(args.quick, only)
    path = write_combined(results, started, time.perf_counter() - t0, args.quick)
    print(path.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
