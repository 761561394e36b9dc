"""(d) What logging a model costs against the size of its weights (target: one copy, RSS <= 1.5x).

Each of `log_chat_pipeline` and `log_onnx_prompt_model` (tasks/mlflow_models.py, via `.fn`)
runs in a child process of its own, into a fresh SQLite store, on the mid-size model (the tiny
one with --quick). The child reports:

- wall seconds of the call;
- peak RSS growth: the peak resident set during the call minus the resident set after all
  imports. The peak is `VmHWM` of /proc/self/status, reset to the current RSS (clear_refs 5)
  right before the call. `ru_maxrss` is recorded too, but it is not used: Linux carries it
  over `exec` from the forking parent, so a child of a big process (run_all) inherits its peak.
- bytes written: the process's `wchar` (/proc/self/io) during the call, i.e. every byte it
  wrote or copied, temp files included;
- bytes stored: the size of everything under the MLflow artifact root afterwards.

Copies = bytes / weights, where weights = the safetensors files (chat-transformers) or the
onnxruntime-genai folder (prompt-onnx) the task was given.

    python -m benchmarks.logging_cost [--quick]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.recording import REPO_ROOT, Metric, PartResult, check, write_results
from benchmarks.sandbox import bench_env
from slmops.config import WrapperKind

TARGET_COPIES = 1.0
TARGET_RSS_RATIO = 1.5
# "One copy" allows the files around the weights (tokenizer, MLmodel, examples): 5%.
COPY_SLACK = 1.05
KINDS = (WrapperKind.CHAT_TRANSFORMERS, WrapperKind.PROMPT_ONNX)


def _io_counters() -> dict[str, int]:
    counters = {}
    for line in Path("/proc/self/io").read_text().splitlines():
        key, value = line.split(":")
        counters[key.strip()] = int(value)
    return counters


def _memory_kb() -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS of this process image) in KiB."""
    found = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(value.split()[0])
    return found


def _reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def _tree_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def child(kind: WrapperKind, size: str, root: Path) -> dict[str, Any]:
    """Runs in the child process: import everything, then log once and measure."""
    import resource

    import onnxruntime_genai  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from prefect.logging import disable_run_logger

    from slmops.config import GenerationSpec, OnnxExportSpec
    from slmops.store import ModelStore
    from tasks.mlflow_models import log_chat_pipeline, log_onnx_prompt_model

    if size == "mid":
        from benchmarks.midsize import ensure_midsize

        mid = ensure_midsize()
        hf_dir, onnx_dir, max_new_tokens = mid.hf_dir, mid.onnx_int4_dir, 32
    else:
        from benchmarks.midsize import bench_cache
        from offline_kit.embedded import ensure_embedded_repos
        from slmops.config import (
            PHI3_ONNX_INT4_SUBFOLDER,
            TINY_PHI3_ONNX_REPO_ID,
            TINY_PHI3_REPO_ID,
        )

        repos = ensure_embedded_repos(bench_cache() / "embedded")
        hf_dir = repos[TINY_PHI3_REPO_ID]
        onnx_dir = repos[TINY_PHI3_ONNX_REPO_ID] / PHI3_ONNX_INT4_SUBFOLDER
        max_new_tokens = 64
    if kind is WrapperKind.CHAT_TRANSFORMERS:
        weights = sum(p.stat().st_size for p in hf_dir.glob("*.safetensors"))
    else:
        weights = _tree_bytes(onnx_dir)

    store = ModelStore(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    generation = GenerationSpec(max_new_tokens=max_new_tokens)
    source = {"repo_id": f"slmops-bench/phi3-{size}", "commit": "0" * 40}
    # Create the store's tables first: a one-off cost of a new store, not of logging.
    store.client().search_experiments()

    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _reset_peak_rss()
    rss_before = _memory_kb()["VmRSS"]
    io_before = _io_counters()
    t0 = time.perf_counter()
    with disable_run_logger():
        if kind is WrapperKind.CHAT_TRANSFORMERS:
            ref = log_chat_pipeline.fn(store, "bench", hf_dir, generation, source)
        else:
            ref = log_onnx_prompt_model.fn(
                store, "bench", onnx_dir, generation, OnnxExportSpec(), source
            )
    wall = time.perf_counter() - t0
    io_after = _io_counters()
    peak = _memory_kb()["VmHWM"]
    maxrss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    artifact_root = root / "mlartifacts"
    return {
        "kind": kind.value,
        "size": size,
        "model_uri": ref.model_uri,
        "weights_bytes": weights,
        "wall_s": wall,
        "rss_after_imports_bytes": rss_before * 1024,
        "rss_peak_bytes": peak * 1024,
        "rss_growth_bytes": (peak - rss_before) * 1024,
        "ru_maxrss_after_imports_bytes": maxrss_before * 1024,
        "ru_maxrss_after_bytes": maxrss_after * 1024,
        "children_rss_peak_bytes": children * 1024,
        "written_bytes": io_after["wchar"] - io_before["wchar"],
        "storage_write_bytes": io_after["write_bytes"] - io_before["write_bytes"],
        "read_bytes": io_after["rchar"] - io_before["rchar"],
        "stored_bytes": _tree_bytes(artifact_root) if artifact_root.exists() else 0,
    }


def measure(kind: WrapperKind, size: str) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix=f"slmops-bench-log-{kind.value}-"))
    out = root / "result.json"
    try:
        env = bench_env(root / "home", root / "prefect")
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "benchmarks.logging_cost",
                "--child",
                kind.value,
                size,
                str(root),
            ],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=1800,
            check=False,
        )
        if proc.returncode != 0 or not out.exists():
            tail = "\n".join((proc.stderr or proc.stdout).splitlines()[-20:])
            raise RuntimeError(f"logging {kind.value} failed ({proc.returncode}):\n{tail}")
        return json.loads(out.read_text())
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run(quick: bool = False) -> PartResult:
    result = PartResult("logging_cost", "(d) Logging a model: time, copies, memory", quick=quick)
    t0 = time.perf_counter()
    size = "tiny" if quick else "mid"
    rows = []
    for kind in KINDS:
        m = measure(kind, size)
        weights = m["weights_bytes"]
        stored, written = m["stored_bytes"] / weights, m["written_bytes"] / weights
        rss = m["rss_growth_bytes"] / weights
        rows.append(
            {
                "task": f"log ({kind.value}, {size})",
                "weights_MB": round(weights / 1e6, 1),
                "wall_s": round(m["wall_s"], 1),
                "stored_MB": round(m["stored_bytes"] / 1e6, 1),
                "written_MB": round(m["written_bytes"] / 1e6, 1),
                "peak_rss_growth_MB": round(m["rss_growth_bytes"] / 1e6, 1),
                "stored/weights": round(stored, 2),
                "written/weights": round(written, 2),
                "rss_growth/weights": round(rss, 2),
            }
        )
        result.details[kind.value] = m
        copy_bound = TARGET_COPIES * COPY_SLACK
        result.add(
            Metric(f"{kind.value}: log wall", round(m["wall_s"], 1), "s"),
            Metric(
                f"{kind.value}: bytes written / weights",
                round(written, 2),
                "x",
                target=f"<= {copy_bound:.2f}",
                met=check(written, "<=", copy_bound),
                note=f"stored in the artifact store: {stored:.2f}x",
            ),
            Metric(
                f"{kind.value}: peak RSS growth / weights",
                round(rss, 2),
                "x",
                target=f"<= {TARGET_RSS_RATIO}",
                met=check(rss, "<=", TARGET_RSS_RATIO) if size == "mid" else None,
                note="" if size == "mid" else "tiny model: RSS is all runtime, not weights",
            ),
        )
    result.tables["per task"] = rows
    result.wall_s = time.perf_counter() - t0
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the tiny model instead")
    parser.add_argument(
        "--child", nargs=3, metavar=("KIND", "SIZE", "ROOT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child:
        kind, size, root = args.child
        measured = child(WrapperKind(kind), size, Path(root))
        (Path(root) / "result.json").write_text(json.dumps(measured))
        return
    result = run(quick=args.quick)
    print(write_results(result).with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
