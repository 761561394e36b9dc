"""(b) Raw runtime tokens/s against the same model served over HTTP (target: served >= 90% of raw).

For each served model, the same prompts are generated greedily, with the same number of new
tokens, in this process ("raw") and through `POST /invocations` ("served"):

- prompt-onnx: an onnxruntime-genai Generator loop on the int4 folder inside the logged model,
  exactly as the pyfunc runs it (tokens = generation steps);
- chat-transformers: the transformers pipeline loaded from the logged model (same weights and
  dtype as the server), called on the chat-templated prompt with `max_new_tokens` and greedy
  decoding, as MLflow's llm/v1/chat wrapper does (tokens = generated ids; served: the
  response's `usage.completion_tokens`, which MLflow counts the same way).

One warm-up per prompt and side, then repetitions alternating raw and served; medians reported.
Answers are compared, so a served model that generates something else is caught.

Models: the tiny Phi-3 served by a release run (always) and the mid-size model logged and
served with the project's tasks (not with --quick).

    python -m benchmarks.serving_overhead [--quick] [--reps N]
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable
from typing import Any

import httpx

from benchmarks.recording import Metric, PartResult, check, median, write_results
from benchmarks.served import (
    ServedModel,
    answer_of,
    request_body,
    serving_midsize,
    serving_release,
)
from offline_kit.tiny_model import chat_prompt
from slmops.config import WrapperKind

TARGET_RATIO = 0.90
QUESTIONS = (
    "What is the capital of Spain?",
    "Write a short poem about the sea.",
    "Explain machine learning, models, data, training, validation, serving and registry.",
    "Tell me a joke about atom",
)

# (answer text, new tokens, seconds)
Generation = tuple[str, int, float]


def onnx_runner(model: ServedModel) -> Callable[[str], Generation]:
    """The pyfunc's generation loop, run directly on the model's onnxruntime-genai folder."""
    import json

    import onnxruntime_genai as og

    folder = model.onnx_folder()
    context = json.loads((folder / "genai_config.json").read_text())["model"]["context_length"]
    og_model = og.Model(str(folder))
    tokenizer = og.Tokenizer(og_model)
    eos = {int(t) for t in tokenizer.eos_token_ids}

    def generate(question: str) -> Generation:
        t0 = time.perf_counter()
        ids = tokenizer.encode(chat_prompt(question))
        params = og.GeneratorParams(og_model)
        params.set_search_options(
            max_length=min(len(ids) + model.max_new_tokens, context), do_sample=False
        )
        generator = og.Generator(og_model, params)
        generator.append_tokens(ids)
        new: list[int] = []
        while not generator.is_done():
            generator.generate_next_token()
            new.append(int(generator.get_next_tokens()[0]))
        del generator
        text = tokenizer.decode([t for t in new if t not in eos]).lstrip()
        return text, len(new), time.perf_counter() - t0

    return generate


def transformers_runner(model: ServedModel) -> Callable[[str], Generation]:
    """The logged pipeline, called as MLflow's llm/v1/chat wrapper calls it (token ids back)."""
    import mlflow

    pipe = mlflow.transformers.load_model(str(model.folder()), return_type="pipeline")
    tokenizer = pipe.tokenizer

    def generate(question: str) -> Generation:
        t0 = time.perf_counter()
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
        out = pipe(
            prompt, max_new_tokens=model.max_new_tokens, do_sample=False, return_tensors=True
        )
        prompt_length = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        new = out[0]["generated_token_ids"][prompt_length:]
        text = tokenizer.decode(new, skip_special_tokens=True)
        return text, len(new), time.perf_counter() - t0

    return generate


def same_text(a: str, b: str) -> bool:
    # MLflow's chat wrapper decodes prompt + answer and cuts the prompt off by length, with
    # tokenization-space cleanup: whitespace may differ, words may not.
    return a.split() == b.split()


def measure_model(model: ServedModel, reps: int) -> dict[str, Any]:
    """Raw and served generations of every question, alternating; per-request records."""
    onnx = model.kind is WrapperKind.PROMPT_ONNX
    raw = onnx_runner(model) if onnx else transformers_runner(model)
    records: list[dict[str, Any]] = []
    with httpx.Client(timeout=300.0) as client:

        def served(question: str) -> tuple[str, int | None, float]:
            """Answer, new tokens (the chat wrapper's usage; None for prompt-onnx), seconds."""
            body = request_body(
                model, chat_prompt(question), [{"role": "user", "content": question}]
            )
            t0 = time.perf_counter()
            response = client.post(f"{model.url}/invocations", json=body)
            elapsed = time.perf_counter() - t0
            response.raise_for_status()
            usage = None if onnx else response.json()[0]["usage"]["completion_tokens"]
            return answer_of(model, response).strip(), usage, elapsed

        for question in QUESTIONS:  # warm-up: first calls pay for allocations and caches
            raw(question)
            served(question)
        for rep in range(reps):
            for question in QUESTIONS:
                raw_text, tokens, raw_s = raw(question)
                served_text, served_tokens, served_s = served(question)
                records.append(
                    {
                        "rep": rep,
                        "question": question,
                        "tokens": tokens,
                        # prompt-onnx: the same greedy steps, when the answers are the same
                        "served_tokens": tokens if served_tokens is None else served_tokens,
                        "raw_s": raw_s,
                        "served_s": served_s,
                        "same_answer": same_text(raw_text, served_text),
                    }
                )
    return {"records": records}


def summarize(model: ServedModel, records: list[dict[str, Any]]) -> dict[str, Any]:
    raw_tps = median(r["tokens"] / r["raw_s"] for r in records)
    served_tps = median(r["served_tokens"] / r["served_s"] for r in records)
    best_raw = max(r["tokens"] / r["raw_s"] for r in records)
    best_served = max(r["served_tokens"] / r["served_s"] for r in records)
    return {
        "model": model.label,
        "new_tokens_median": median(r["tokens"] for r in records),
        "raw_latency_ms": round(1000 * (median(r["raw_s"] for r in records) or 0), 1),
        "served_latency_ms": round(1000 * (median(r["served_s"] for r in records) or 0), 1),
        "overhead_ms": round(1000 * (median(r["served_s"] - r["raw_s"] for r in records) or 0), 1),
        "raw_tok_s": round(raw_tps or 0, 1),
        "served_tok_s": round(served_tps or 0, 1),
        "served/raw": round((served_tps or 0) / raw_tps, 3) if raw_tps else None,
        "served/raw, best of each": round(best_served / best_raw, 3),
        "same_answers": f"{sum(r['same_answer'] for r in records)}/{len(records)}",
    }


MEASURED_KINDS = (WrapperKind.PROMPT_ONNX, WrapperKind.CHAT_TRANSFORMERS)


def measure(models: list[ServedModel], reps: int, result: PartResult) -> None:
    """Raw vs served for each prompt-onnx and chat-transformers model (chat-onnx runs the same
    onnxruntime-genai loop as prompt-onnx behind a chat template: part (e) loads it)."""
    rows = result.tables.setdefault("per model (medians over prompts x repetitions)", [])
    for model in models:
        if model.kind not in MEASURED_KINDS:
            continue
        data = measure_model(model, reps)
        row = summarize(model, data["records"])
        rows.append(row)
        result.details[model.label] = {"model_uri": model.model_uri, **data}
        ratio = row["served/raw"]
        result.add(
            Metric(f"{model.label}: raw tokens/s", row["raw_tok_s"], "tok/s"),
            Metric(f"{model.label}: served tokens/s", row["served_tok_s"], "tok/s"),
            Metric(
                f"{model.label}: served / raw",
                ratio,
                target=f">= {TARGET_RATIO}",
                met=check(ratio, ">=", TARGET_RATIO),
                note=f"{row['new_tokens_median']} new tokens/request, HTTP+wrapper overhead "
                f"{row['overhead_ms']} ms/request; best-of-each ratio "
                f"{row['served/raw, best of each']}",
            ),
        )


def run(
    quick: bool = False,
    reps: int | None = None,
    release: list[ServedModel] | None = None,
    midsize: list[ServedModel] | None = None,
) -> PartResult:
    """Measure the release's served models and the mid-size ones (started here unless given)."""
    result = PartResult("serving_overhead", "(b) Raw runtime vs served model", quick=quick)
    t0 = time.perf_counter()
    reps = reps or (2 if quick else 5)
    with contextlib.ExitStack() as stack:
        models = release if release is not None else stack.enter_context(serving_release())
        measure(models, reps, result)
        if not quick:
            mid = midsize if midsize is not None else stack.enter_context(serving_midsize())
            measure(mid, max(2, reps // 2), result)
    result.wall_s = time.perf_counter() - t0
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model only, 2 repetitions")
    parser.add_argument("--reps", type=int, default=None, help="repetitions (default 5)")
    args = parser.parse_args()
    result = run(quick=args.quick, reps=args.reps)
    print(write_results(result).with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
