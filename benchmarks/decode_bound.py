"""Is int4 decode of the full-size model bound by memory or by compute on this CPU? (issue #10)

The roofline of `benchmarks.int4_sweep` assumes a decode step only reads the weights: a step of
one turn would then take as long as a step of two or four (the weights are read once per step
whatever the batch). This part times engine steps at batch 1, 2 and 4 on the Phi-3-mini twin's
int4 build (`offline_kit.twin_model`, the default build: block 32, accuracy level 4) and splits a
step into a part that does not grow with the batch (reading the weights, and whatever else
each step pays once) and a part per turn (the matmul arithmetic: unpacking int4, the dot
products), by a least-squares line through (batch, step time).

If the per-turn part is large, a batch-1 step cannot come near the memory roofline, whatever the
weights' layout: the 70% goal of issue #10 would need the per-turn part to shrink, which is the
kernel's (onnxruntime's MLAS, AVX2 here, no AVX-512/VNNI), not the builder's options.

    python -m benchmarks.decode_bound [--tokens 24] [--turns 8]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks.int4_sweep import read_bandwidth
from benchmarks.recording import Metric, PartResult, write_results
from benchmarks.serving_engine import _run_turns, step_bytes

BATCH_SIZES = (1, 2, 4)
PROMPT = "Explain machine learning in a few words."
GB = 1e9


def twin_int4_dir() -> Path:
    """The 32-layer twin's int4 release folder, built if missing (~10 min)."""
    from benchmarks.fullsize import FIRST_SEED, SECOND_SEED, _twin
    from benchmarks.midsize import bench_cache
    from slmops.config import PHI3_ONNX_INT4_SUBFOLDER

    for seed in (SECOND_SEED, FIRST_SEED):  # whichever the rehearsal left on disk
        for folder in (bench_cache() / "twin").glob(f"phi3-twin-*-l32-s{seed}-onnx"):
            if (folder / PHI3_ONNX_INT4_SUBFOLDER / "genai_config.json").is_file():
                return folder / PHI3_ONNX_INT4_SUBFOLDER
    twin = _twin(32, SECOND_SEED)
    assert twin.onnx_repo_dir is not None
    return twin.onnx_repo_dir / PHI3_ONNX_INT4_SUBFOLDER


def measure(onnx_dir: Path, tokens: int, turns: int) -> list[dict[str, Any]]:
    """Per batch size: `turns` turns of exactly `tokens` new tokens, submitted at once; a step
    is the median gap between two tokens of a turn (every turn of a batch gets one per step).
    Then one turn alone through `OnnxGenerator.generate` (onnxruntime-genai's Generator, as
    `benchmarks.int4_sweep` times it), to compare the engine's batch-1 step with it."""
    from slmops.onnx_genai_runtime import OnnxGenerator, TurnSpec

    rows = []
    for batch in BATCH_SIZES:
        generator = OnnxGenerator(onnx_dir, max_batch_size=batch, token_budget=256)
        prompt = generator.encode(PROMPT)
        specs = [TurnSpec(prompt, tokens, min_new_tokens=tokens) for _ in range(turns)]
        _run_turns(generator, specs[:batch])  # warm-up: first-run allocations
        wall, stamps = _run_turns(generator, specs)
        # Gaps between two tokens of a turn: a turn's prefill, before its first, is left out.
        step = statistics.median(b - a for turn in stamps for a, b in itertools.pairwise(turn))
        rows.append(
            {
                "path": "og.Engine (SharedEngine)",
                "batch": batch,
                "largest batch seen": generator.engine.largest_batch,
                "tokens": turns * tokens,
                "wall_s": round(wall, 2),
                "tokens/s": round(turns * tokens / wall, 2),
                "ms per step": round(1000 * step, 1),
            }
        )
        if batch == 1:
            times: list[float] = []
            started = time.perf_counter()

            def stamp(_: list[int], times: list[float] = times) -> bool:
                times.append(time.perf_counter())
                return False

            generator.generate(prompt, tokens, stop=stamp)
            elapsed = time.perf_counter() - started
            rows.append(
                {
                    "path": "og.Generator (generate)",
                    "batch": 1,
                    "largest batch seen": 1,
                    "tokens": tokens,
                    "wall_s": round(elapsed, 2),
                    "tokens/s": round(tokens / elapsed, 2),
                    "ms per step": round(
                        1000 * statistics.median(b - a for a, b in itertools.pairwise(times)), 1
                    ),
                }
            )
        del generator
    return rows


def split_step(rows: list[dict[str, Any]]) -> tuple[float, float]:
    """(ms per step paid once, ms per turn in the step): least squares over the batch sizes."""
    engine = [r for r in rows if r["path"].startswith("og.Engine")]
    xs = [float(r["batch"]) for r in engine]
    ys = [float(r["ms per step"]) for r in engine]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mean_x) ** 2 for x in xs
    )
    return mean_y - slope * mean_x, slope


def main(argv: list[str] | None = None) -> PartResult:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=24, help="new tokens per turn")
    parser.add_argument("--turns", type=int, default=8, help="turns submitted at once")
    args = parser.parse_args(argv)

    result = PartResult(part="decode_bound", title="int4 decode at full size: memory or compute")
    started = time.perf_counter()
    onnx_dir = twin_int4_dir()
    bandwidth = read_bandwidth(2)["best"] / GB
    _, read_per_step = step_bytes(onnx_dir)
    roofline_ms = 1000 * read_per_step / (bandwidth * GB)
    rows = measure(onnx_dir, args.tokens, args.turns)
    once_ms, per_turn_ms = split_step(rows)
    batch1_ms = float(rows[0]["ms per step"])
    result.wall_s = time.perf_counter() - started
    result.add(
        Metric("memory roofline per step", round(roofline_ms, 1), "ms",
               note=f"{read_per_step / GB:.2f} GB read at {bandwidth:.1f} GB/s (2 threads)"),
        Metric("batch-1 step", batch1_ms, "ms",
               note=f"{roofline_ms / batch1_ms:.0%} of the roofline"),
        Metric("step part paid once (intercept)", round(once_ms, 1), "ms",
               note=f"{roofline_ms / once_ms:.0%} of it is the roofline" if once_ms > 0 else ""),
        Metric("step part per turn (slope)", round(per_turn_ms, 1), "ms",
               note="arithmetic: what a memory-bound step would not pay"),
        Metric("batch-1 step at 70% of the roofline", round(roofline_ms / 0.7, 1), "ms",
               note="the goal of issue #10"),
    )  # fmt: skip
    result.tables["steps by batch size"] = rows
    result.details = {"onnx_dir": str(onnx_dir), "tokens": args.tokens, "turns": args.turns}
    print(write_results(result))
    return result


if __name__ == "__main__":
    main()
