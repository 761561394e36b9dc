"""(a) A cold release run against re-runs with unchanged inputs (target: re-run <= 15% of cold).

Runs `python -m flows.release deployments/local.yaml` as a subprocess with a fresh SLMOPS_HOME
and PREFECT_HOME, then again (cached) in the same homes, in two scenarios:

- `pipeline`: the embedded model is prebuilt into the cache, so "cold" is a cold pipeline
  (fresh Prefect database, MLflow store, HF cache, ONNX exports, servers). The target applies
  here.
- `with-model-build`: nothing prebuilt, so the cold run also builds the tiny Phi-3 and its ONNX
  release (~20 s), as on a fresh machine.
- `pipeline, Prefect server` (not with --quick): as `pipeline`, but against a persistent
  `prefect server start` (`PREFECT_API_URL` set, as for deployments), so no run pays for
  starting the temporary server.

Per-task seconds come from the temporary Prefect server's database; states (Cached or not)
from the `Task run '...' - Finished in state ...` log lines. The model servers are stopped
after each scenario.

    python -m benchmarks.release_rerun [--quick] [--reruns N]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from benchmarks.recording import Metric, PartResult, check, median, write_results
from benchmarks.sandbox import ReleaseRun, ReleaseSandbox, prebuilt_embedded

TARGET_RATIO = 0.15


def _run_row(label: str, run: ReleaseRun) -> dict[str, Any]:
    return {
        "run": label,
        "rc": run.returncode,
        "wall_s": round(run.wall_s, 2),
        "startup_s": run.startup_s,
        "flow_s": run.flow_s,
        "teardown_s": run.teardown_s,
        "cached_tasks": sum(t.state == "Cached" for t in run.tasks),
        "tasks": len(run.tasks),
    }


def _task_rows(cold: ReleaseRun, reruns: list[ReleaseRun]) -> list[dict[str, Any]]:
    cold_tasks = cold.by_task()
    rerun_tasks = [r.by_task() for r in reruns]
    rows = []
    for name, entry in cold_tasks.items():
        again = [r.get(name, {}) for r in rerun_tasks]
        states = sorted({s for e in again for s in e.get("states", [])})
        rows.append(
            {
                "task": name,
                "runs": entry["runs"],
                "cold_s": round(entry["seconds"], 2),
                "rerun_s": round(median(e.get("seconds", 0.0) for e in again) or 0.0, 2),
                "rerun_state": "/".join(states),
            }
        )
    return rows


def measure_scenario(
    label: str,
    prebuild: bool,
    reruns: int,
    result: PartResult,
    keep_serving: bool = False,
    prefect_server: bool = False,
) -> ReleaseSandbox | None:
    """Cold run + `reruns` cached runs; adds metrics and tables to `result`.

    With `keep_serving`, the sandbox (servers running) is returned for other parts to use;
    the caller must close it.
    """
    embedded = prebuilt_embedded() if prebuild else None
    sandbox = ReleaseSandbox(label.split(",")[0], prebuilt_embedded=embedded)
    try:
        if prefect_server:
            sandbox.start_prefect_server()
        cold = sandbox.run()
        if cold.returncode != 0:
            raise RuntimeError(f"cold release run failed ({cold.returncode}):\n{cold.log_tail}")
        again = []
        for _ in range(reruns):
            run = sandbox.run()
            if run.returncode != 0:
                raise RuntimeError(f"release re-run failed ({run.returncode}):\n{run.log_tail}")
            again.append(run)
        rerun_wall = median(r.wall_s for r in again) or float("nan")
        ratio = rerun_wall / cold.wall_s
        rerun_flow = median(r.flow_s for r in again if r.flow_s is not None)
        flow_ratio = rerun_flow / cold.flow_s if rerun_flow and cold.flow_s else None
        targeted = prebuild  # a model build is not part of the pipeline's cost
        result.add(
            Metric(f"{label}: cold release wall", round(cold.wall_s, 1), "s"),
            Metric(f"{label}: cached re-run wall (median of {reruns})", round(rerun_wall, 1), "s"),
            Metric(
                f"{label}: re-run / cold (process wall)",
                round(ratio, 3),
                target=f"<= {TARGET_RATIO}" if targeted else "",
                met=check(ratio, "<=", TARGET_RATIO) if targeted else None,
            ),
            Metric(
                f"{label}: re-run / cold (flow run only)",
                None if flow_ratio is None else round(flow_ratio, 3),
                note="excludes imports and the temporary Prefect server",
            ),
        )
        result.tables[f"{label}: runs"] = [_run_row("cold", cold)] + [
            _run_row(f"re-run {i + 1}", r) for i, r in enumerate(again)
        ]
        result.tables[f"{label}: seconds per task"] = _task_rows(cold, again)
        result.details[label] = {
            "cold": _details(cold),
            "reruns": [_details(r) for r in again],
            "sandbox": str(sandbox.root),
        }
        if keep_serving:
            return sandbox
    except BaseException:
        sandbox.close()
        raise
    sandbox.close()
    return None


def _details(run: ReleaseRun) -> dict[str, Any]:
    return {
        "returncode": run.returncode,
        "wall_s": round(run.wall_s, 3),
        "startup_s": run.startup_s,
        "flow_s": run.flow_s,
        "teardown_s": run.teardown_s,
        "tasks": [t.__dict__ for t in run.tasks],
    }


def run_keeping_servers(
    quick: bool = False, reruns: int | None = None
) -> tuple[PartResult, ReleaseSandbox]:
    """Both scenarios; the pipeline scenario's sandbox is returned with its servers running."""
    result = PartResult("release_rerun", "(a) Cold release run vs cached re-run", quick=quick)
    t0 = time.perf_counter()
    reruns = reruns or (1 if quick else 3)
    if not quick:
        measure_scenario("with-model-build", prebuild=False, reruns=1, result=result)
        measure_scenario("pipeline, Prefect server", True, reruns, result, prefect_server=True)
    sandbox = measure_scenario("pipeline", True, reruns, result, keep_serving=True)
    assert sandbox is not None
    result.wall_s = time.perf_counter() - t0
    return result, sandbox


def run(quick: bool = False, reruns: int | None = None) -> PartResult:
    result, sandbox = run_keeping_servers(quick, reruns)
    sandbox.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="pipeline scenario, one re-run")
    parser.add_argument("--reruns", type=int, default=None, help="cached re-runs (default 3)")
    args = parser.parse_args()
    result = run(quick=args.quick, reruns=args.reruns)
    print(write_results(result).with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
