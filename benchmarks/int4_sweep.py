"""The int4 builder options at full size, against the memory roofline (issue #10).

Decode on CPU reads every int4 weight once per token, so its floor is the weights read per step
over the memory read bandwidth. This part sweeps the options of `OnnxExportSpec` that change
what a step reads or how it computes (`block_size` 32/128, `accuracy_level` 1/4) and the
session's `intra_op_num_threads` (1/2), on the Phi-3-mini twin (`offline_kit.twin_model`).

The fp32 export is made once (the builder's, as `slmops.onnx_builder` runs it) and quantized
per option pair with the project's own `slmops.onnx_int4_streaming`; each int4 folder (~2.7 GB)
is measured, then deleted before the next. Every measurement runs in a fresh process, one at a
time, so its RSS is the model's own:

- decode: `slmops.onnx_genai_runtime.OnnxGenerator`'s greedy loop on a short prompt; time to
  the first token (prefill) and ms per token over the rest; loaded and peak RSS;
- agreement: the greedy tokens of the sample prompts against transformers in bf16, counted as
  the release's int4 parity counts them (`tasks.validation`: up to each prompt's first
  divergence); the bf16 reference is computed once;
- roofline: weights read per step (`benchmarks.serving_engine.step_bytes`: the int4 files less
  the fp32 input embedding) over the best read bandwidth of numpy reductions on the same
  number of threads.

Target (issue #10): the best option at >= 70% of its roofline.

    python -m benchmarks.int4_sweep [--layers 1] [--fp32-dir DIR] [--deadline 15:40]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.midsize import bench_cache
from benchmarks.recording import Metric, PartResult, check, write_results
from benchmarks.serving_engine import step_bytes
from offline_kit.twin_model import DEFAULT_SEED, TWIN_BUILDER_VERSION

GB = 1e9
OPTIONS = ((32, 4), (128, 4), (32, 1), (128, 1))  # (block_size, accuracy_level); default first
THREADS = (1, 2)
# Timed decodes per measurement; the fastest counts: other processes on the shared cores only
# ever slow a decode down.
DECODE_REPEATS = 3
DECODE_PROMPT = "Explain machine learning in a few words."
AGREEMENT_PROMPTS = (
    "What is the capital of Spain?",
    "Write a short poem about the sea.",
    "What color is the sky?",
)
TARGET_EFFICIENCY = 0.7
# A measurement's memory budget: the int4 model is ~2.7 GB, bf16 transformers ~8 GB.
MEASURE_BUDGET_BYTES = 12 << 30


def read_bandwidth(threads: int, megabytes: int = 1536, repeats: int = 3) -> dict[str, float]:
    """Bytes per second read by `threads` numpy reductions over disjoint parts of one array,
    best of `repeats`, per kernel (numpy releases the GIL in reductions). A float64 sum is
    compute-bound on one core here (~10 GB/s); a SIMD max reads fastest, so it sets the roofline.
    """
    import numpy as np

    data = np.ones(megabytes * 2**20, dtype=np.uint8)
    kernels: dict[str, tuple[Any, Any]] = {
        "sum float64": (np.sum, data.view(np.float64)),
        "max float32": (np.max, data.view(np.float32)),
        "max uint8": (np.max, data),
    }
    rates = {}
    for name, (reduce, view) in kernels.items():
        parts = np.array_split(view, threads)
        best = float("inf")
        for _ in range(repeats):
            workers = [threading.Thread(target=reduce, args=(part,)) for part in parts]
            t0 = time.perf_counter()
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join()
            best = min(best, time.perf_counter() - t0)
        rates[name] = data.nbytes / best
    return {**rates, "best": max(rates.values())}


def twin_dir(layers: int) -> Path:
    folder = bench_cache() / "twin" / f"phi3-twin-v{TWIN_BUILDER_VERSION}-l{layers}-s{DEFAULT_SEED}"
    if not (folder / "config.json").exists():
        raise SystemExit(f"{folder} is missing: run python -m benchmarks.fullsize first")
    return folder


def _run_json(args: list[str], what: str) -> tuple[dict[str, Any], int]:
    """Run `python -m benchmarks.int4_sweep ARGS` in a fresh process under the memory watchdog;
    (its JSON on the last stdout line, its peak RSS)."""
    from slmops.onnx_builder import run_within_memory

    cmd = [sys.executable, "-m", "benchmarks.int4_sweep", *args]
    proc, peak = run_within_memory(cmd, MEASURE_BUDGET_BYTES)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1]), peak


def _timed_step(cmd: list[str], out: Path, what: str) -> dict[str, Any]:
    """One build step under the memory watchdog: wall seconds and peak RSS."""
    from slmops.onnx_builder import run_within_memory

    t0 = time.perf_counter()
    proc, peak = run_within_memory(cmd, MEASURE_BUDGET_BYTES)
    if proc.returncode != 0 or not (out / "genai_config.json").exists():
        raise RuntimeError(f"{what} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return {"wall_s": round(time.perf_counter() - t0, 1), "peak_rss_gb": round(peak / GB, 2)}


def export_fp32(model_dir: Path, out: Path) -> dict[str, Any]:
    """The builder's fp32 export, as `slmops.onnx_builder` runs it."""
    cache = Path(tempfile.mkdtemp(prefix=".builder-cache-", dir=out.parent))
    try:
        cmd = [
            sys.executable, "-m", "onnxruntime_genai.models.builder",
            "-i", str(model_dir), "-o", str(out), "-c", str(cache), "-p", "fp32", "-e", "cpu",
        ]  # fmt: skip
        return _timed_step(cmd, out, "fp32 export")
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def quantize(fp32_dir: Path, out: Path, block_size: int, accuracy_level: int) -> dict[str, Any]:
    cmd = [
        sys.executable, "-m", "slmops.onnx_int4_streaming", str(fp32_dir), str(out),
        "--block-size", str(block_size), "--accuracy-level", str(accuracy_level),
    ]  # fmt: skip
    return _timed_step(cmd, out, f"int4 quantizer (block {block_size}, acc {accuracy_level})")


def set_threads(onnx_dir: Path, threads: int) -> None:
    path = onnx_dir / "genai_config.json"
    config = json.loads(path.read_text())
    config["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = threads
    path.write_text(json.dumps(config, indent=4))


def agreement(reference: list[list[int]], tokens: list[list[int]]) -> float:
    """Share of greedy tokens that agree up to each prompt's first divergence (as the int4
    parity of `tasks.validation.compare_runtimes` counts them)."""
    from tasks.validation import _common_prefix

    compared = agreeing = 0
    for ref, new in zip(reference, tokens, strict=True):
        compared += max(len(ref), len(new))
        agreeing += _common_prefix(ref, new)
    return agreeing / compared if compared else 1.0


# --- what the fresh processes run ---------------------------------------------------------------


def _reference_main(model_dir: Path, tokens: int) -> dict[str, Any]:
    """bf16 transformers' greedy tokens for the agreement prompts."""
    from tasks.validation import _transformers_greedy

    t0 = time.perf_counter()
    results = _transformers_greedy(model_dir, AGREEMENT_PROMPTS, tokens, "auto")
    return {
        "prompt_ids": [p for p, _ in results],
        "new_ids": [n for _, n in results],
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def _decode_main(onnx_dir: Path, tokens: int, agreement_tokens: int) -> dict[str, Any]:
    """Load the model, time a greedy decode, then generate the agreement prompts' tokens."""
    import psutil

    from slmops.onnx_genai_runtime import OnnxGenerator

    process = psutil.Process()
    t0 = time.perf_counter()
    generator = OnnxGenerator(onnx_dir, max_batch_size=1)
    load_s = time.perf_counter() - t0
    loaded_rss = process.memory_info().rss
    ids = generator.encode(DECODE_PROMPT)
    generator.generate(ids, 2)  # warm-up: first-run allocations out of the timings
    stamps: list[float] = []

    def stamp(new_tokens: list[int]) -> bool:
        stamps.append(time.perf_counter())
        return False

    repeats: list[dict[str, Any]] = []
    for _ in range(DECODE_REPEATS):
        stamps.clear()
        start = time.perf_counter()
        generated = generator.generate(ids, tokens, stop=stamp)
        steps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
        repeats.append(
            {
                "prefill_ms": round(1000 * (stamps[0] - start), 1),
                "ms_per_token": round(1000 * sum(steps) / len(steps), 2),
                "step_ms": [round(1000 * s, 2) for s in steps],
            }
        )
    peak_rss = process.memory_info().rss
    agreement_ids = [
        generator.generate(generator.encode(p), agreement_tokens) for p in AGREEMENT_PROMPTS
    ]
    return {
        "load_s": round(load_s, 2),
        "loaded_rss_bytes": loaded_rss,
        "rss_after_decode_bytes": peak_rss,
        "prompt_tokens": len(ids),
        "generated_tokens": len(generated),
        "prefill_ms": min(float(r["prefill_ms"]) for r in repeats),
        "ms_per_token": min(float(r["ms_per_token"]) for r in repeats),
        "repeats": repeats,
        "agreement_prompt_ids": [generator.encode(p) for p in AGREEMENT_PROMPTS],
        "agreement_new_ids": agreement_ids,
    }


# --- the part -----------------------------------------------------------------------------------


def _past(deadline: datetime | None, seconds_needed: float) -> bool:
    return deadline is not None and time.time() + seconds_needed > deadline.timestamp()


def run(
    layers: int = 32,
    tokens: int = 32,
    agreement_tokens: int = 16,
    fp32_dir: Path | None = None,
    deadline: datetime | None = None,
    options: tuple[tuple[int, int], ...] = OPTIONS,
    reference_from: Path | None = None,
) -> PartResult:
    result = PartResult("int4_sweep", "int4 builder options vs the memory roofline (twin)")
    result.quick = layers != 32
    t0 = time.perf_counter()
    load_start = [round(x, 2) for x in os.getloadavg()]
    model_dir = twin_dir(layers)
    work = bench_cache() / "int4-sweep"
    work.mkdir(parents=True, exist_ok=True)
    bandwidths = {n: read_bandwidth(n) for n in THREADS}
    bandwidth = {n: rates["best"] for n, rates in bandwidths.items()}
    print(f"read bandwidth: { {n: round(b / GB, 2) for n, b in bandwidth.items()} } GB/s")

    if reference_from is not None:
        # bf16 transformers takes ~2 minutes and 8 GB: reuse an earlier run's tokens.
        earlier = json.loads(reference_from.read_text())["details"]
        if earlier["agreement_prompts"] != list(AGREEMENT_PROMPTS):
            raise SystemExit(f"{reference_from} was made on other prompts")
        reference = {**earlier["bf16_reference"], "from": str(reference_from)}
        if len(reference["new_ids"][0]) != agreement_tokens:
            raise SystemExit(f"{reference_from} has {len(reference['new_ids'][0])} tokens")
    else:
        reference, ref_peak = _run_json(
            ["reference", str(model_dir), "--tokens", str(agreement_tokens)], "bf16 reference"
        )
        reference["peak_rss_gb"] = round(ref_peak / GB, 2)
    print(f"bf16 reference: {reference}")
    made_fp32 = fp32_dir is None
    export = {"given": str(fp32_dir)}
    if fp32_dir is None:
        fp32_dir = work / f"fp32-l{layers}"
        shutil.rmtree(fp32_dir, ignore_errors=True)
        export = export_fp32(model_dir, fp32_dir)
        print(f"fp32 export: {export}")
    rows: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    skipped: list[str] = []
    slowest_option_s = 0.0
    try:
        for block_size, accuracy_level in options:
            if _past(deadline, slowest_option_s):
                skipped.append(f"block {block_size} acc {accuracy_level}: past the deadline")
                continue
            started = time.perf_counter()
            out = work / f"int4-l{layers}-b{block_size}-a{accuracy_level}"
            shutil.rmtree(out, ignore_errors=True)
            try:
                built = quantize(fp32_dir, out, block_size, accuracy_level)
                files, per_step = step_bytes(out)
                for threads in THREADS:
                    set_threads(out, threads)
                    measured, peak = _run_json(
                        ["decode", str(out), "--tokens", str(tokens),
                         "--agreement-tokens", str(agreement_tokens)],
                        f"decode (block {block_size}, acc {accuracy_level}, {threads} threads)",
                    )  # fmt: skip
                    roofline_ms = 1000 * per_step / bandwidth[threads]
                    agree = agreement(reference["new_ids"], measured["agreement_new_ids"])
                    same_prompts = measured["agreement_prompt_ids"] == reference["prompt_ids"]
                    row = {
                        "block_size": block_size,
                        "accuracy_level": accuracy_level,
                        "threads": threads,
                        "quantize_s": built["wall_s"],
                        "int4_gb": round(files / GB, 3),
                        "loaded_rss_gb": round(measured["loaded_rss_bytes"] / GB, 2),
                        "prefill_ms": measured["prefill_ms"],
                        "ms_per_token": measured["ms_per_token"],
                        "roofline_ms_per_token": round(roofline_ms, 1),
                        "efficiency": round(roofline_ms / measured["ms_per_token"], 3),
                        "greedy_agreement": round(agree, 3) if same_prompts else None,
                    }
                    rows.append(row)
                    runs.append({**row, "build": built, "measure_peak_rss_gb": round(peak / GB, 2),
                                 "read_per_step_bytes": per_step, "files_bytes": files,
                                 "loadavg": [round(x, 2) for x in os.getloadavg()],
                                 "measured": measured})  # fmt: skip
                    print(json.dumps(row), flush=True)
            finally:
                shutil.rmtree(out, ignore_errors=True)
            slowest_option_s = max(slowest_option_s, time.perf_counter() - started)
            _record(result, rows, runs, bandwidths, reference, export, skipped, load_start, t0)
            write_results(result)
    finally:
        if made_fp32:
            shutil.rmtree(fp32_dir, ignore_errors=True)
    _record(result, rows, runs, bandwidths, reference, export, skipped, load_start, t0)
    return result


def _record(
    result: PartResult,
    rows: list[dict[str, Any]],
    runs: list[dict[str, Any]],
    bandwidths: dict[int, dict[str, float]],
    reference: dict[str, Any],
    export: dict[str, Any],
    skipped: list[str],
    load_start: list[float],
    t0: float,
) -> None:
    load_now = [round(x, 2) for x in os.getloadavg()]
    bandwidth = {n: rates["best"] for n, rates in bandwidths.items()}
    result.metrics = []
    if rows:
        best = min(rows, key=lambda r: r["ms_per_token"])
        result.add(
            Metric("fastest option", f"block {best['block_size']} acc {best['accuracy_level']} "
                   f"{best['threads']} threads", "", note=f"{best['ms_per_token']} ms/token"),
            Metric("fastest / its roofline", best["efficiency"], "", f">= {TARGET_EFFICIENCY}",
                   check(best["efficiency"], ">=", TARGET_EFFICIENCY),
                   note=f"roofline {best['roofline_ms_per_token']} ms/token"),
            Metric("its greedy agreement with bf16", best["greedy_agreement"], ""),
        )  # fmt: skip
    result.add(
        *(Metric(f"read bandwidth, {n} thread(s)", round(b / GB, 2), "GB/s",
                 note="best of numpy sum / max kernels")
          for n, b in bandwidth.items()),
        Metric("load average (start, now)", f"{load_start} -> {load_now}", ""),
    )  # fmt: skip
    result.tables["sweep"] = rows
    result.details = {
        "decode_prompt": DECODE_PROMPT,
        "agreement_prompts": list(AGREEMENT_PROMPTS),
        "bf16_reference": reference,
        "fp32_export": export,
        "bandwidth_bytes_per_s": bandwidths,
        "skipped": skipped,
        "loadavg_start": load_start,
        "loadavg_end": load_now,
        "runs": runs,
    }
    result.wall_s = time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("reference", "decode"):
        sub = argparse.ArgumentParser()
        sub.add_argument("folder", type=Path)
        sub.add_argument("--tokens", type=int, required=True)
        sub.add_argument("--agreement-tokens", type=int, default=16)
        args = sub.parse_args(argv[1:])
        if argv[0] == "reference":
            out = _reference_main(args.folder, args.tokens)
        else:
            out = _decode_main(args.folder, args.tokens, args.agreement_tokens)
        print(json.dumps(out))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32, help="twin size (1: a smoke run)")
    parser.add_argument("--tokens", type=int, default=32, help="decoded tokens timed")
    parser.add_argument("--agreement-tokens", type=int, default=16)
    parser.add_argument("--fp32-dir", type=Path, help="an fp32 export of the twin to reuse")
    parser.add_argument("--deadline", help="HH:MM UTC: start no option that would end later")
    parser.add_argument(
        "--options",
        default=",".join(f"{b}:{a}" for b, a in OPTIONS),
        help="block_size:accuracy_level pairs, comma-separated",
    )
    parser.add_argument(
        "--reference-from", type=Path, help="a results JSON whose bf16 reference tokens to reuse"
    )
    args = parser.parse_args(argv)
    deadline = None
    if args.deadline:
        hour, minute = (int(x) for x in args.deadline.split(":"))
        deadline = datetime.now(UTC).replace(hour=hour, minute=minute, second=0, microsecond=0)
    options = tuple(
        (int(b), int(a)) for b, a in (pair.split(":") for pair in args.options.split(","))
    )
    result = run(
        args.layers, args.tokens, args.agreement_tokens, args.fp32_dir, deadline, options,
        args.reference_from,
    )  # fmt: skip
    print(write_results(result).with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
