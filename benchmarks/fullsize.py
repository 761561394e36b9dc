"""The full-size rehearsal: what releasing Phi-3-mini costs on this machine (issue 10).

Runs the release flow with `deployments/phi3-mini.yaml`'s settings pointed at the Phi-3-mini
twin (`offline_kit.twin_model`: the real config, random bf16 weights, 7.6 GB in two shards, and its
int4 ONNX release) served by the loopback fake hub, as operators run it (a subprocess per flow,
own SLMOPS_HOME and PREFECT_HOME), in four stages:

1. `cold`: a first release (fetch, log, validate, register, promote, serve three servers);
2. `cached`: the same release again (nothing should be fetched, exported or logged);
3. `new-commit`: a release of a changed commit (the twin with other weights), so that every
   server is switched to a new version;
4. `rollback`: chat-transformers back to version 1;
5. `prune`: the `prune` flow keeping the newest released version of each model (`keep_last:
   1`), so that at this size it deletes something: the ONNX wrappers' version 1 and their
   shared ONNX folder; transformers v1 is Production again (rolled back) and v2 the newest.

Per stage: wall time (and the flow run's and its tasks' seconds, from the Prefect server), the
peak RSS of the flow process tree, of the flow process alone (a model loaded to validate or
evaluate it lives in a child process) and of each model server's process tree (sampled every
0.5 s; servers found by their state files), the peak of their sum and of the machine's used
memory (total - available, other users included), bytes written by the flow process tree
(/proc io counters: the flow process's own, into which Linux folds each child it reaps, plus
the children still running at its last sample), bytes stored under SLMOPS_HOME, free disk
before and after, and the memory check's verdict per server switch (from the flow's log).

Validation settings are parameters only (`generation.max_new_tokens`, as for any model); the
twin's generation is deterministic and bounded by construction. The gate evaluates an evenly
spread subset of the Phi-3 set (`--eval-items`, written as a .jsonl file that
`evaluation.eval_set` names, as a user would): bf16 transformers on 2 cores takes ~30 s per
item here, so the whole set (60) would cost half an hour per wrapper; the evaluation tasks'
seconds per item are in the results, to price the whole set.

    python -m benchmarks.fullsize [--layers 32] [--max-new-tokens 8] [--budget-gb 20]
        [--eval-items 6]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import yaml

from benchmarks.midsize import bench_cache, tiny_model_dir
from benchmarks.recording import REPO_ROOT, Metric, PartResult, check, write_results
from benchmarks.sandbox import RUN_SUFFIX, ReleaseSandbox

GB = 1e9
FIRST_SEED, SECOND_SEED = 20260611, 20260612
_SWITCH_LINE = re.compile(
    r"(phi3-mini-[a-z-]+): ((?:blue/green switch|stopping the old|not starting|to validate)[^\n]*)"
)


@dataclass
class Peaks:
    """Peak RSS per process group, sampled while a stage runs."""

    flow: int = 0
    flow_process: int = 0  # the flow's own process, without the processes it started
    servers: dict[str, int] = field(default_factory=dict)
    ours_total: int = 0  # flow tree + every server tree, at the same moment
    machine_used: int = 0  # total - available: every process on the machine
    written: dict[int, int] = field(default_factory=dict)  # pid -> write_bytes seen
    # The flow's children at each sample: a child reaped by then is in the flow's own counter.
    children_alive: set[int] = field(default_factory=set)

    def flow_tree_written(self, flow_pid: int) -> int:
        """Bytes the flow's process tree wrote, each counted once: Linux adds a reaped child's
        I/O to its parent's counters, so summing every process's counter counts a finished
        child (the process that logs the weights, say) twice."""
        return self.written.get(flow_pid, 0) + sum(
            self.written.get(pid, 0) for pid in self.children_alive
        )


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _rss(procs: list[psutil.Process]) -> int:
    total = 0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            total += proc.memory_info().rss
    return total


def _server_pids(servers_dir: Path) -> dict[str, int]:
    pids = {}
    for path in servers_dir.glob("*.json"):
        try:
            pids[path.stem] = int(json.loads(path.read_text())["pid"])
        except (ValueError, KeyError, OSError):
            continue
    return pids


class Sampler(threading.Thread):
    """Samples the flow process tree, the servers and the machine until stopped."""

    def __init__(self, flow_pid: int, servers_dir: Path, interval_s: float = 0.5):
        super().__init__(daemon=True)
        self.flow_pid, self.servers_dir, self.interval_s = flow_pid, servers_dir, interval_s
        self.peaks = Peaks()
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            self.sample()
            self._done.wait(self.interval_s)

    def sample(self) -> None:
        servers = {name: _tree(pid) for name, pid in _server_pids(self.servers_dir).items()}
        server_pids = {p.pid for procs in servers.values() for p in procs}
        flow = [p for p in _tree(self.flow_pid) if p.pid not in server_pids]
        flow_rss = _rss(flow)
        total = flow_rss
        peaks = self.peaks
        peaks.flow = max(peaks.flow, flow_rss)
        peaks.flow_process = max(peaks.flow_process, _rss(flow[:1]))
        for name, procs in servers.items():
            rss = _rss(procs)
            total += rss
            peaks.servers[name] = max(peaks.servers.get(name, 0), rss)
        peaks.ours_total = max(peaks.ours_total, total)
        memory = psutil.virtual_memory()
        peaks.machine_used = max(peaks.machine_used, memory.total - memory.available)
        for proc in flow:
            try:
                written = proc.io_counters().write_bytes
            except (psutil.Error, AttributeError):
                continue
            peaks.written[proc.pid] = max(peaks.written.get(proc.pid, 0), written)
        if flow and flow[0].pid == self.flow_pid:  # the flow still runs: its live children
            peaks.children_alive = {p.pid for p in flow[1:]}

    def stop(self) -> Peaks:
        self._done.set()
        self.join()
        self.sample()
        return self.peaks


def _folder_bytes(folder: Path) -> int:
    if not folder.exists():
        return 0
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def eval_subset(config: dict[str, Any], items: int, folder: Path) -> Path:
    """`items` evenly spread items of the release's evaluation set, as a .jsonl file."""
    from slmops.eval_sets import eval_set_path

    lines = [
        line
        for line in eval_set_path(config["evaluation"]["eval_set"]).read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    step = max(1, len(lines) // items)
    path = folder / f"phi3-subset-{items}.jsonl"
    path.write_text("\n".join(lines[::step][:items]) + "\n")
    return path


def release_config(max_new_tokens: int, budget_gb: float | None) -> dict[str, Any]:
    """deployments/phi3-mini.yaml, pointed at the twin's repos, with the rehearsal's knobs."""
    from offline_kit.twin_model import TWIN_ONNX_REPO_ID, TWIN_REPO_ID

    config = yaml.safe_load((REPO_ROOT / "deployments" / "phi3-mini.yaml").read_text())["config"]
    config["hub"].update(repo_id=TWIN_REPO_ID, onnx_repo_id=TWIN_ONNX_REPO_ID)
    config["generation"]["max_new_tokens"] = max_new_tokens
    config["serve"]["memory_budget_gb"] = budget_gb
    # Random weights answer noise: the rehearsal measures cost, so no quality floor.
    config["gate"]["min_score"] = 0.0
    return config


@dataclass
class Stage:
    name: str
    argv: list[str]


def run_stage(sandbox: ReleaseSandbox, stage: Stage, hub_endpoint: str) -> dict[str, Any]:
    env = {**sandbox.env, "HF_ENDPOINT": hub_endpoint}
    log_path = sandbox.root / f"{stage.name}.log"
    free_before = shutil.disk_usage(sandbox.root).free
    stored_before = _folder_bytes(sandbox.home)
    load_before = psutil.getloadavg()
    started_epoch, started = time.time(), time.perf_counter()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, *stage.argv], cwd=REPO_ROOT, env=env, stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        sampler = Sampler(proc.pid, sandbox.home / "servers")
        sampler.start()
        returncode = proc.wait()
    wall = time.perf_counter() - started
    peaks = sampler.stop()
    text = log_path.read_text(errors="replace")
    switches = sorted({f"{m[1]}: {m[2]}" for m in _SWITCH_LINE.finditer(text)})
    # Where a stage's time goes: the flow run and its tasks, from the Prefect server's database.
    flow_start, flow_s, task_seconds = sandbox.flow_run_record()
    per_task: dict[str, float] = {}
    for task_name, seconds in task_seconds.items():
        key = RUN_SUFFIX.sub("", task_name)
        per_task[key] = per_task.get(key, 0.0) + (seconds or 0.0)
    slowest = sorted(per_task.items(), key=lambda item: -item[1])[:10]
    return {
        "stage": stage.name,
        "rc": returncode,
        "wall_s": round(wall, 1),
        "startup_s": round(flow_start - started_epoch, 1) if flow_start else None,
        "flow_run_s": round(flow_s, 1) if flow_s is not None else None,
        "tasks_s": round(sum(per_task.values()), 1),
        "flow_peak_rss_gb": round(peaks.flow / GB, 2),
        "flow_process_peak_rss_gb": round(peaks.flow_process / GB, 2),
        **{f"{name}_peak_rss_gb": round(v / GB, 2) for name, v in sorted(peaks.servers.items())},
        "ours_peak_rss_gb": round(peaks.ours_total / GB, 2),
        "machine_peak_used_gb": round(peaks.machine_used / GB, 2),
        "written_gb": round(peaks.flow_tree_written(proc.pid) / GB, 2),
        "stored_delta_gb": round((_folder_bytes(sandbox.home) - stored_before) / GB, 2),
        "free_disk_before_gb": round(free_before / GB, 1),
        "free_disk_after_gb": round(shutil.disk_usage(sandbox.root).free / GB, 1),
        "load_before": [round(x, 2) for x in load_before],
        "switches": switches,
        "slowest_tasks": [(name, round(seconds, 2)) for name, seconds in slowest],
        "log_tail": "\n".join(text.splitlines()[-8:]) if returncode else "",
    }


def _twin(layers: int, seed: int):
    from offline_kit.twin_model import ensure_twin_repos

    return ensure_twin_repos(
        bench_cache() / "twin", tiny_model_dir(bench_cache()), num_layers=layers, seed=seed
    )


def main(argv: list[str] | None = None) -> PartResult:
    from offline_kit.fake_hub import FakeHub

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32, help="32 = full size; 1-2 for CI size")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--budget-gb", type=float, default=20.0, help="serve.memory_budget_gb")
    parser.add_argument(
        "--eval-items", type=int, default=6, help="items of the Phi-3 set the gate evaluates"
    )
    parser.add_argument("--keep", action="store_true", help="keep the sandbox folder")
    parser.add_argument(
        "--reclaim-disk",
        action="store_true",
        help="delete the first twin once its stages ran (a full-size run needs ~60 GB free)",
    )
    parser.add_argument(
        "--stop-after",
        choices=("cached", "rollback"),
        default="rollback",
        help="cached: only the first release, cold and cached (about half the time); "
        "rollback: all stages (prune included)",
    )
    args = parser.parse_args(argv)

    result = PartResult(part="fullsize", title="Releasing the Phi-3-mini twin: what it costs")
    result.quick = args.layers < 32
    started = time.perf_counter()
    first, second = _twin(args.layers, FIRST_SEED), _twin(args.layers, SECOND_SEED)
    rows = []
    with ReleaseSandbox("fullsize", keep=args.keep) as sandbox:
        config = release_config(args.max_new_tokens, args.budget_gb)
        subset = eval_subset(config, args.eval_items, sandbox.root)
        config["evaluation"]["eval_set"] = str(subset)
        release = Stage("release", ["-m", "flows.release", json.dumps(config)])
        rollback_config = {
            "kind": "chat-transformers", "version": 1, "reason": "rehearsal rollback",
            "registry": config["registry"], "serve": config["serve"],
        }  # fmt: skip
        rollback = Stage(
            "rollback",
            ["-c", "import sys; from flows.rollback import rollback; from slmops.config import "
             "RollbackConfig; rollback(RollbackConfig.model_validate_json(sys.argv[1]))",
             json.dumps(rollback_config)],
        )  # fmt: skip
        prune = Stage(
            "prune",
            ["-m", "flows.prune", json.dumps({"registry": config["registry"], "keep_last": 1,
                                              "reason": "rehearsal retention"})],
        )  # fmt: skip
        # A persistent Prefect server, as deployments use: no stage pays for starting (and
        # migrating the database of) a temporary one.
        sandbox.env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "180"
        sandbox.start_prefect_server()
        with FakeHub(first.as_hub_repos()) as hub:
            for name in ("cold", "cached"):
                rows.append(run_stage(sandbox, Stage(name, release.argv), hub.endpoint))
                print(json.dumps(rows[-1]), flush=True)
        if args.reclaim_disk:  # its files live on in the HF cache and the MLflow store
            for folder in (first.model_dir, first.onnx_repo_dir):
                if folder is not None:
                    shutil.rmtree(folder, ignore_errors=True)
        if args.stop_after == "rollback":
            with FakeHub(second.as_hub_repos()) as hub:
                for stage in (Stage("new-commit", release.argv), rollback, prune):
                    rows.append(run_stage(sandbox, stage, hub.endpoint))
                    print(json.dumps(rows[-1]), flush=True)
        stored = _folder_bytes(sandbox.home)
    result.wall_s = time.perf_counter() - started

    by_stage = {row["stage"]: row for row in rows}
    cold, cached = by_stage["cold"], by_stage["cached"]
    ratio = cached["wall_s"] / cold["wall_s"] if cold["wall_s"] else None
    peak_ours = max(row["ours_peak_rss_gb"] for row in rows)
    result.add(
        Metric("stages that exited 0", sum(r["rc"] == 0 for r in rows), f"of {len(rows)}",
               f">= {len(rows)}", sum(r["rc"] == 0 for r in rows) == len(rows)),
        Metric("cold release", cold["wall_s"], "s"),
        Metric("cached re-run / cold", round(ratio, 3) if ratio else None, "", "<= 0.05",
               check(ratio, "<=", 0.05)),
        Metric("peak RSS, flow + servers", peak_ours, "GB", "<= 20",
               check(peak_ours, "<=", 20.0)),
        Metric("peak machine memory used", max(r["machine_peak_used_gb"] for r in rows), "GB",
               note="total - available, other users included"),
        Metric("stored under SLMOPS_HOME after all stages", round(stored / GB, 2), "GB"),
    )  # fmt: skip
    result.tables["stages"] = [
        {k: v for k, v in row.items() if k not in ("switches", "log_tail", "slowest_tasks")}
        for row in rows
    ]
    result.tables["slowest tasks"] = [
        {"stage": row["stage"], "task": name, "seconds": seconds}
        for row in rows
        for name, seconds in row["slowest_tasks"]
    ]
    result.tables["server switches"] = [
        {"stage": row["stage"], "switch": s} for row in rows for s in row["switches"]
    ]
    result.details = {
        "layers": args.layers,
        "max_new_tokens": args.max_new_tokens,
        "budget_gb": args.budget_gb,
        "eval_items": args.eval_items,
        "twin_weights_gb": round(_folder_bytes(first.model_dir) / GB, 2),
        "twin_onnx_gb": round(_folder_bytes(first.onnx_repo_dir) / GB, 2)
        if first.onnx_repo_dir
        else None,
        "failures": {row["stage"]: row["log_tail"] for row in rows if row["rc"]},
    }
    print(write_results(result))
    return result


if __name__ == "__main__":
    main()
