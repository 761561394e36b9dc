"""(c) onnxruntime-genai int4 against torch fp32, per generated token (target: >= 3x faster).

On the mid-size Phi-3-shaped model (`benchmarks.midsize`; its int4 export is made by the
project's `build_onnx_model` with `OnnxExportSpec()`: int4, block 32, accuracy level 4). The
same prompt and number of new tokens in both runtimes, greedy; a timestamp after every token:

- time to first token (prompt processing + one step),
- decode latency per token (the steps after the first), the figure the target is about.

One warm-up, then repetitions alternating the runtimes (so that load from elsewhere on the
machine hits both alike); medians reported. Without --quick, torch in bf16 (the dtype the
transformers wrapper loads Phi-3 in: `dtype="auto"`) is measured too, for information.

    python -m benchmarks.runtime_latency [--quick] [--reps N] [--new-tokens N]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.midsize import ensure_midsize
from benchmarks.recording import Metric, PartResult, check, median, write_results
from offline_kit.tiny_model import chat_prompt

TARGET_SPEEDUP = 3.0
PROMPT = chat_prompt("Write a short poem about the sea, then explain why it is blue.")

# timestamps: start, then one per new token
Timed = list[float]


def og_generator(
    folder: Path, new_tokens: int, threads: int | None = None
) -> tuple[Callable[[], Timed], dict[str, Any]]:
    import json

    import onnxruntime_genai as og

    config = og.Config(str(folder))
    if threads is not None:
        options = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
        config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
    model = og.Model(config)
    ids = og.Tokenizer(model).encode(PROMPT)

    def generate() -> Timed:
        stamps = [time.perf_counter()]
        params = og.GeneratorParams(model)
        params.set_search_options(
            max_length=len(ids) + new_tokens, min_length=len(ids) + new_tokens, do_sample=False
        )
        generator = og.Generator(model, params)
        generator.append_tokens(ids)
        while not generator.is_done():
            generator.generate_next_token()
            generator.get_next_tokens()
            stamps.append(time.perf_counter())
        return stamps

    return generate, {"prompt_tokens": len(ids), "threads": threads or "default"}


def torch_generators(
    folder: Path, new_tokens: int, dtype_name: str, thread_counts: tuple[int | None, ...]
) -> list[tuple[Callable[[], Timed], dict[str, Any]]]:
    """One generate function per thread count, sharing one loaded model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.generation.streamers import BaseStreamer

    dtype = getattr(torch, dtype_name)
    tokenizer = AutoTokenizer.from_pretrained(folder, add_bos_token=False)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    inputs = tokenizer(PROMPT, add_special_tokens=False, return_tensors="pt")
    default_threads = torch.get_num_threads()

    class Stamps(BaseStreamer):
        """generate() calls put() once with the prompt, then once per new token."""

        def __init__(self) -> None:
            self.stamps: list[float] = []

        def put(self, value: Any) -> None:
            self.stamps.append(time.perf_counter())

        def end(self) -> None:
            pass

    def generator(threads: int | None) -> Callable[[], Timed]:
        def generate() -> Timed:
            streamer = Stamps()
            torch.set_num_threads(threads or default_threads)
            try:
                start = time.perf_counter()
                with torch.no_grad():
                    model.generate(
                        **inputs,
                        max_new_tokens=new_tokens,
                        min_new_tokens=new_tokens,
                        do_sample=False,
                        streamer=streamer,
                    )
            finally:
                torch.set_num_threads(default_threads)
            return [start, *streamer.stamps[1:]]

        return generate

    prompt_tokens = int(inputs["input_ids"].shape[1])
    return [
        (generator(t), {"prompt_tokens": prompt_tokens, "threads": t or default_threads})
        for t in thread_counts
    ]


def latency(stamps: Timed) -> dict[str, float]:
    start, first, last = stamps[0], stamps[1], stamps[-1]
    steps = len(stamps) - 2
    return {
        "new_tokens": len(stamps) - 1,
        "ttft_ms": 1000 * (first - start),
        "decode_ms_per_token": 1000 * (last - first) / steps if steps else float("nan"),
        "total_ms_per_token": 1000 * (last - start) / (len(stamps) - 1),
    }


def run(quick: bool = False, reps: int | None = None, new_tokens: int | None = None) -> PartResult:
    result = PartResult("runtime_latency", "(c) onnxruntime-genai int4 vs torch fp32", quick=quick)
    t0 = time.perf_counter()
    reps = reps or (2 if quick else 5)
    new_tokens = new_tokens or (16 if quick else 64)
    model = ensure_midsize()
    og_default, og_single = (og_generator(model.onnx_int4_dir, new_tokens, t) for t in (None, 1))
    fp32_default, fp32_single = torch_generators(model.hf_dir, new_tokens, "float32", (None, 1))
    runtimes: dict[str, tuple[Callable[[], Timed], dict[str, Any]]] = {
        "og int4": og_default,
        "torch fp32": fp32_default,
        "og int4, 1 thread": og_single,
        "torch fp32, 1 thread": fp32_single,
    }
    if not quick:
        (runtimes["torch bf16"],) = torch_generators(model.hf_dir, new_tokens, "bfloat16", (None,))
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in runtimes}
    for generate, _ in runtimes.values():
        generate()  # warm-up
    for _ in range(reps):
        for name, (generate, _) in runtimes.items():
            samples[name].append(latency(generate()))

    rows = []
    for name, runs in samples.items():
        rows.append(
            {
                "runtime": name,
                "threads": runtimes[name][1]["threads"],
                "new_tokens": runs[0]["new_tokens"],
                "ttft_ms": round(median(r["ttft_ms"] for r in runs) or 0, 1),
                "decode_ms/token": round(median(r["decode_ms_per_token"] for r in runs) or 0, 2),
                "best decode_ms/token": round(min(r["decode_ms_per_token"] for r in runs), 2),
                "total_ms/token": round(median(r["total_ms_per_token"] for r in runs) or 0, 2),
            }
        )
    by_name = {row["runtime"]: row for row in rows}
    og_ms = by_name["og int4"]["decode_ms/token"]
    speedup = by_name["torch fp32"]["decode_ms/token"] / og_ms if og_ms else None
    best = (
        by_name["torch fp32"]["best decode_ms/token"] / by_name["og int4"]["best decode_ms/token"]
    )
    result.add(
        Metric("og int4 decode latency", og_ms, "ms/token"),
        Metric("torch fp32 decode latency", by_name["torch fp32"]["decode_ms/token"], "ms/token"),
        Metric(
            "speed-up og int4 over torch fp32 (median)",
            None if speedup is None else round(speedup, 2),
            "x",
            target=f">= {TARGET_SPEEDUP}",
            met=check(speedup, ">=", TARGET_SPEEDUP),
            note=f"best-of-{reps} ratio {best:.2f}x",
        ),
    )
    single = by_name["og int4, 1 thread"]["decode_ms/token"]
    single_speedup = by_name["torch fp32, 1 thread"]["decode_ms/token"] / single if single else None
    result.add(
        Metric(
            "speed-up og int4 over torch fp32, 1 thread each (median)",
            None if single_speedup is None else round(single_speedup, 2),
            "x",
            target=f">= {TARGET_SPEEDUP}",
            met=check(single_speedup, ">=", TARGET_SPEEDUP),
            note="kernels alone: robust to other load on the machine",
        )
    )
    if "torch bf16" in by_name:
        result.add(
            Metric(
                "torch bf16 decode latency", by_name["torch bf16"]["decode_ms/token"], "ms/token"
            )
        )
    result.tables["per runtime (medians)"] = rows
    result.details = {
        "model": {
            "hf_dir": str(model.hf_dir),
            "weights_bytes": model.weights_bytes(),
            "onnx_dir": str(model.onnx_int4_dir),
            "onnx_bytes": model.onnx_bytes(),
        },
        "runtimes": {name: info for name, (_, info) in runtimes.items()},
        "samples": samples,
    }
    result.wall_s = time.perf_counter() - t0
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16 tokens, 2 repetitions, no bf16")
    parser.add_argument("--reps", type=int, default=None, help="repetitions (default 5)")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens (default 64)")
    args = parser.parse_args()
    result = run(quick=args.quick, reps=args.reps, new_tokens=args.new_tokens)
    print(write_results(result).with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
