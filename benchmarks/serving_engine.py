"""(f) The serving engine on the mid-size model: raw `SharedEngine` vs served through the front door.

Side by side in one run, every generation a fixed length (`ignore_eos`; the mid-size model never
ends early anyway), greedy, the same chat prompts:

- raw: `slmops.onnx_genai_runtime.OnnxGenerator` in this process, no HTTP. The batched ceiling
  (aggregate tokens/s of 16 turns submitted at once) for `engine_max_batch_size` 1, 2 and 4;
  one turn alone (single-client tokens/s).
- served: the model logged as the ONNX chat pyfunc with the project's task, `mlflow models
  serve` (`tasks.serving.launch_server`, which gives it its token-stream port) and the front
  door (`tasks.serving.serve_front_door`), called over HTTP by 1, 4 and 16 clients, streamed
  and not: aggregate tokens/s, p50/p99 latency, time to the first streamed content, and the
  engine steps each load took by batch size (from the model server's engine health).
- time to first token: while the model is served, each question in turn through the front door
  (one client, streamed) and on a raw engine in this process (its first token: prefill + one
  token; its first text: what a stream can send first), alternating which goes first, so that
  both see the same load.
- the roofline: the int4 weights read per generation step against this machine's memory
  bandwidth (a numpy copy), and what batching bought per step.

Targets (issue #13): served at 16 clients >= 90% of the raw ceiling and >= 1.5x served at
1 client; time to first streamed token <= 1.2x raw prefill + one token; single-client
served/raw >= 0.9.

    python -m benchmarks.serving_engine [--quick] [--tokens N]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from benchmarks.recording import Metric, PartResult, check, percentile, write_results
from benchmarks.served import log_midsize
from slmops.config import WrapperKind

QUESTIONS = (
    "What is the capital of Spain?",
    "Write a short poem about the sea.",
    "What color is the sky?",
    "Explain machine learning, models, data, training, validation, serving and registry.",
)
MODEL_NAME = "mid-chat-onnx"
BATCH_SIZES = (1, 2, 4)
CEILING_TURNS = 16
CLIENT_TIMEOUT_S = 300.0


# --- raw: the shared engine in this process ---------------------------------------------------


def _prompts(generator: Any) -> list[list[int]]:
    """The questions as the served chat model encodes them (its chat template)."""
    return [
        generator.encode(generator.chat_prompt([{"role": "user", "content": q}])) for q in QUESTIONS
    ]


def _run_turns(generator: Any, specs: Sequence[Any]) -> tuple[float, list[list[float]]]:
    """Submit `specs` at once; wall seconds, and each turn's token times (seconds after the
    submit, one per token)."""
    t0 = time.perf_counter()
    turns = generator.submit_many(specs)
    stamps: list[list[float]] = [[] for _ in turns]

    def drain(index: int) -> None:
        for _ in turns[index]:
            stamps[index].append(time.perf_counter() - t0)

    readers = [threading.Thread(target=drain, args=(i,)) for i in range(len(turns))]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join()
    return time.perf_counter() - t0, stamps


def measure_raw(
    onnx_dir: Path,
    tokens: int,
    repeats: int,
    batch_sizes: Sequence[int] = BATCH_SIZES,
    threads: int | None = None,
) -> dict[str, Any]:
    """Raw ceilings per batch size, one turn alone and prefill + one token (batch size 4)."""
    from slmops.onnx_genai_runtime import OnnxGenerator, TurnSpec

    sweep = []
    single: dict[str, Any] = {}
    for batch in batch_sizes:
        generator = OnnxGenerator(onnx_dir, max_batch_size=batch, threads=threads)
        prompts = _prompts(generator)
        specs = [
            TurnSpec(prompts[i % len(prompts)], tokens, min_new_tokens=tokens)
            for i in range(CEILING_TURNS)
        ]
        _run_turns(generator, specs[:batch])  # warm-up
        rates = []
        for _ in range(repeats):
            wall, stamps = _run_turns(generator, specs)
            made = sum(len(turn) for turn in stamps)
            rates.append(made / wall)
        sweep.append(
            {
                "engine_max_batch_size": batch,
                "largest batch seen": generator.engine.largest_batch,
                "tokens/s (median)": round(statistics.median(rates), 1),
                "tokens/s (runs)": " ".join(f"{r:.1f}" for r in rates),
            }
        )
        if batch == max(BATCH_SIZES):
            single = _single(generator, prompts, tokens, repeats)
        del generator
    return {"sweep": sweep, **single}


def _single(generator: Any, prompts: list[list[int]], tokens: int, repeats: int) -> dict:
    from slmops.onnx_genai_runtime import TurnSpec

    alone = []
    for r in range(max(repeats, 3)):
        ids = prompts[r % len(prompts)]
        wall, stamps = _run_turns(generator, [TurnSpec(ids, tokens, min_new_tokens=tokens)])
        made = sum(len(turn) for turn in stamps)
        alone.append(made / wall)
    return {"single_tokens_per_s": statistics.median(alone)}


def _raw_firsts(generator: Any, ids: list[int], tokens: int) -> tuple[float, float, int]:
    """One turn on the raw engine: seconds to its first token (prefill + one token), seconds to
    the first text a stream can send, and the tokens until then. The random mid-size model
    makes byte-fallback tokens that decode to no character yet, and a stream holds them back
    (as the served model's does) until they do."""
    from slmops.onnx_genai_runtime import TextTurn, TurnSpec

    t0 = time.perf_counter()
    (turn,) = TextTurn.start(generator, [TurnSpec(ids, tokens, min_new_tokens=tokens)])
    first_token = None
    for token in turn.turn:
        if first_token is None:
            first_token = time.perf_counter() - t0
        if turn.stream.push(token):
            break
    first_text = time.perf_counter() - t0
    turn.turn.cancel()
    for _ in turn.turn:  # until the engine has let the turn go: nothing left running
        pass
    return first_token or first_text, first_text, len(turn.stream.tokens)


# --- served: mlflow models serve + the front door ---------------------------------------------


@dataclass(frozen=True)
class Served:
    door_url: str
    model_url: str
    engine_health_url: str  # the model server's engine: turns in flight, steps by batch size


@contextlib.contextmanager
def serving(tokens: int, threads: int | None = None) -> Iterator[Served]:
    """The mid-size model as the ONNX chat pyfunc, served with its token stream, behind the
    front door; both stopped (and their temp store removed) on exit."""
    from prefect.logging import disable_run_logger

    from slmops.onnx_genai_runtime import STREAM_PATH
    from slmops.servers import write_handle
    from slmops.store import ModelStore
    from tasks.serving import _free_port, launch_server, serve_front_door, terminate

    root = Path(tempfile.mkdtemp(prefix="slmops-bench-engine-"))
    servers = root / "servers"
    store = ModelStore(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    handles = []
    try:
        uri = log_midsize(store, WrapperKind.CHAT_ONNX, tokens, engine_threads=threads)
        handle = launch_server(
            uri, MODEL_NAME, WrapperKind.CHAT_ONNX, "127.0.0.1", _free_port("127.0.0.1"),
            servers, store, 300.0,
        )  # fmt: skip
        handles.append(handle)
        write_handle(servers, handle)
        with disable_run_logger():
            door = serve_front_door.fn(servers, "127.0.0.1", None, 120.0)
        handles.append(door)
        assert handle.stream_url is not None
        health_url = handle.stream_url.removesuffix(STREAM_PATH) + "/health"
        yield Served(door_url=door.url, model_url=handle.url, engine_health_url=health_url)
    finally:
        for started in reversed(handles):
            terminate(started)
        shutil.rmtree(root, ignore_errors=True)


@dataclass(frozen=True)
class Answer:
    latency_s: float
    tokens: int
    first_content_s: float | None  # streamed only
    error: str = ""


def _ask(client: httpx.Client, url: str, question: str, tokens: int, stream: bool) -> Answer:
    body = {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": tokens,
        "ignore_eos": True,
        "temperature": 0,
    }
    t0 = time.perf_counter()
    try:
        if not stream:
            response = client.post(f"{url}/v1/chat/completions", json=body)
            if response.status_code != 200:
                return Answer(time.perf_counter() - t0, 0, None, response.text[:200])
            used = int(response.json()["usage"]["completion_tokens"])
            return Answer(time.perf_counter() - t0, used, None)
        body |= {"stream": True, "stream_options": {"include_usage": True}}
        first, used = None, 0
        with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                return Answer(time.perf_counter() - t0, 0, None, response.read().decode()[:200])
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line.removeprefix("data: "))
                if first is None and any(
                    (c.get("delta") or {}).get("content") for c in chunk.get("choices") or []
                ):
                    first = time.perf_counter() - t0
                if chunk.get("usage"):
                    used = int(chunk["usage"]["completion_tokens"])
        return Answer(time.perf_counter() - t0, used, first)
    except httpx.HTTPError as error:
        return Answer(time.perf_counter() - t0, 0, None, type(error).__name__)


def _engine_steps(served: Served) -> dict[str, int]:
    """The served engine's steps so far, by how many turns each generated for."""
    steps = httpx.get(served.engine_health_url, timeout=30).json().get("steps_by_batch", {})
    return {str(k): int(v) for k, v in steps.items()}


def served_load(
    served: Served, clients: int, requests: int, tokens: int, stream: bool
) -> dict[str, Any]:
    """`load` through the front door, with the engine steps it took by batch size (a wave
    that started short shows as steps below the engine's batch)."""
    before = _engine_steps(served)
    row = load(served.door_url, clients, requests, tokens, stream)
    after = _engine_steps(served)
    taken = {k: v - before.get(k, 0) for k, v in after.items() if v > before.get(k, 0)}
    row["engine steps by batch"] = " ".join(f"{k}:{v}" for k, v in sorted(taken.items()))
    return row


def load(url: str, clients: int, requests: int, tokens: int, stream: bool) -> dict[str, Any]:
    """`clients` threads share `requests` requests; aggregate tokens/s over the wall time."""
    answers: list[Answer] = []
    lock = threading.Lock()
    tickets = iter(range(requests))

    def worker() -> None:
        with httpx.Client(timeout=CLIENT_TIMEOUT_S) as client:
            while True:
                with lock:
                    ticket = next(tickets, None)
                if ticket is None:
                    return
                answer = _ask(client, url, QUESTIONS[ticket % len(QUESTIONS)], tokens, stream)
                with lock:
                    answers.append(answer)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    t0 = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - t0
    ok = [a for a in answers if not a.error]
    latencies = [a.latency_s for a in ok]
    firsts = [a.first_content_s for a in ok if a.first_content_s is not None]
    return {
        "clients": clients,
        "mode": "stream" if stream else "whole",
        "requests": len(answers),
        "errors": len(answers) - len(ok),
        "tokens": sum(a.tokens for a in ok),
        "wall_s": round(wall, 2),
        "tokens/s": round(sum(a.tokens for a in ok) / wall, 1) if wall else None,
        "p50_ms": _ms(percentile(latencies, 50)),
        "p99_ms": _ms(percentile(latencies, 99)),
        "ttft_p50_ms": _ms(percentile(firsts, 50)),
        "error_kinds": "; ".join(sorted({a.error[:60] for a in answers if a.error})),
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(1000 * seconds, 1)


def measure_first_tokens(
    onnx_dir: Path, url: str, tokens: int, rounds: int, threads: int | None = None
) -> list[dict]:
    """Each question `rounds` times, streamed through the front door at `url` (one client, one
    request at a time) and on a raw engine in this process: one sample per (round, question),
    raw first in even rounds and served first in odd ones (the first after the other side pays
    for the caches it left cold)."""
    from slmops.onnx_genai_runtime import OnnxGenerator

    generator = OnnxGenerator(onnx_dir, threads=threads)
    prompts = _prompts(generator)
    _raw_firsts(generator, prompts[0], tokens)  # warm-up
    client = httpx.Client(timeout=CLIENT_TIMEOUT_S)

    def raw(q: int) -> dict[str, Any]:
        token_s, text_s, held = _raw_firsts(generator, prompts[q], tokens)
        return {"raw_first_token_s": token_s, "raw_first_text_s": text_s, "tokens_to_text": held}

    def served(q: int) -> dict[str, Any]:
        answer = _ask(client, url, QUESTIONS[q], tokens, stream=True)
        return {"served_first_text_s": answer.first_content_s, "error": answer.error}

    samples = []
    with client:
        for r in range(rounds):
            sides = (raw, served) if r % 2 == 0 else (served, raw)
            for q in range(len(QUESTIONS)):
                sample: dict[str, Any] = {"round": r, "question": q}
                for side in sides:
                    sample |= side(q)
                samples.append(sample)
    return samples


def first_token_table(samples: list[dict]) -> list[dict[str, Any]]:
    """Per question, medians over its samples: raw first token and first text, served first
    text."""
    rows = []
    for q, question in enumerate(QUESTIONS):
        mine = [s for s in samples if s["question"] == q and s["served_first_text_s"]]
        if not mine:
            continue

        def median_ms(key: str, of: list[dict] = mine) -> float | None:
            return _ms(statistics.median(s[key] for s in of))

        served, text = median_ms("served_first_text_s"), median_ms("raw_first_text_s")
        rows.append(
            {
                "question": question[:32],
                "tokens to first text": max(s["tokens_to_text"] for s in mine),
                "raw first token ms": median_ms("raw_first_token_s"),
                "raw first text ms": text,
                "served first text ms": served,
                "served / raw first text": round(served / text, 2) if served and text else None,
            }
        )
    return rows


# --- the roofline -----------------------------------------------------------------------------


def memory_bandwidth(megabytes: int = 512, repeats: int = 5) -> dict[str, float]:
    """Memory traffic of one thread, best of `repeats`: `copyto` (each byte read once and
    written once: 2 x size per pass) and `sum` (read only, but a single-thread reduction that
    may be compute-bound)."""
    import numpy as np

    source = np.ones(megabytes * 2**20 // 8)
    target = np.empty_like(source)
    copies, sums = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(target, source)
        copies.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        source.sum()
        sums.append(time.perf_counter() - t0)
    return {
        "copy_traffic_bytes_per_s": 2 * source.nbytes / min(copies),
        "sum_read_bytes_per_s": source.nbytes / min(sums),
    }


def step_bytes(onnx_dir: Path) -> tuple[int, int]:
    """(bytes of the int4 model files, bytes a generation step reads at least once): the files
    less the input embedding table (vocab x hidden, fp32 in the export), of which a step reads
    one row per token."""
    files = sum(p.stat().st_size for p in onnx_dir.iterdir() if p.name.startswith("model.onnx"))
    model = json.loads((onnx_dir / "genai_config.json").read_text())["model"]
    embedding = int(model["vocab_size"]) * int(model["decoder"]["hidden_size"]) * 4
    return files, files - embedding


# --- the part ---------------------------------------------------------------------------------


def run(quick: bool = False, tokens: int | None = None, threads: int | None = None) -> PartResult:
    from benchmarks.midsize import ensure_midsize

    result = PartResult(
        "serving_engine",
        "(f) Serving engine: raw og.Engine vs served (mid-size model)",
        quick=quick,
    )
    t0 = time.perf_counter()
    load_start = [round(x, 2) for x in os.getloadavg()]
    tokens = tokens or (16 if quick else 64)
    repeats = 1 if quick else 3
    model = ensure_midsize()
    bandwidth = memory_bandwidth()
    raw = measure_raw(model.onnx_int4_dir, tokens, repeats, threads=threads)
    levels = (1, 4, 16)
    per_client = {1: 2 if quick else 4, 4: 2 if quick else 3, 16: 1 if quick else 2}
    rows: list[dict[str, Any]] = []
    with serving(tokens, threads) as served:
        load(served.door_url, 1, 1, tokens, stream=True)  # warm-up
        for stream in (False, True):
            for clients in levels:
                rows.append(
                    served_load(served, clients, clients * per_client[clients], tokens, stream)
                )
        firsts = measure_first_tokens(
            model.onnx_int4_dir, served.door_url, tokens, 2 if quick else 4, threads
        )
    # The raw ceiling once more, after the served runs: the machine is shared.
    raw_after = measure_raw(model.onnx_int4_dir, tokens, 1, (max(BATCH_SIZES),), threads)
    load_end = [round(x, 2) for x in os.getloadavg()]
    wall_s = time.perf_counter() - t0

    def row(clients: int, mode: str) -> dict[str, Any]:
        return next(r for r in rows if r["clients"] == clients and r["mode"] == mode)

    sweep = raw["sweep"]
    best = max(sweep, key=lambda r: r["tokens/s (median)"])
    default = next(r for r in sweep if r["engine_max_batch_size"] == max(BATCH_SIZES))
    after = next(r for r in raw_after["sweep"] if r["engine_max_batch_size"] == max(BATCH_SIZES))
    ceiling = default["tokens/s (median)"]
    served1, served16 = row(1, "whole")["tokens/s"], row(16, "whole")["tokens/s"]
    stream16 = row(16, "stream")["tokens/s"]
    answered = [s for s in firsts if s["served_first_text_s"]]
    ttft = statistics.median(s["served_first_text_s"] for s in answered) if answered else None
    prefill = statistics.median(s["raw_first_token_s"] for s in firsts)
    first_text = statistics.median(s["raw_first_text_s"] for s in firsts)
    # The questions whose first token is text: there the first text is the first token.
    texty = [s for s in answered if s["tokens_to_text"] == 1]
    texty_ttft = percentile([s["served_first_text_s"] for s in texty], 50)
    texty_prefill = percentile([s["raw_first_token_s"] for s in texty], 50)
    # What serving adds to the first text, request by request (same question, same round).
    added = percentile([s["served_first_text_s"] - s["raw_first_text_s"] for s in answered], 50)
    single = raw["single_tokens_per_s"]

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a and b else None

    at_16 = ratio(served16, ceiling)
    scale = ratio(served16, served1)
    ttft_ratio = ratio(ttft, prefill)
    text_ratio = ratio(ttft, first_text)
    texty_ratio = ratio(texty_ttft, texty_prefill)
    single_ratio = ratio(served1, single)
    errors = sum(r["errors"] for r in rows) + sum(bool(s["error"]) for s in firsts)
    result.add(
        Metric("raw ceiling (16 turns, batch 4)", ceiling, "tokens/s",
               note=f"{after['tokens/s (median)']} after the served runs"),
        Metric("raw ceiling, best batch size", best["engine_max_batch_size"], "",
               note=f"{best['tokens/s (median)']} tokens/s"),
        Metric("served x16 / raw ceiling", at_16, "", ">= 0.9", check(at_16, ">=", 0.9),
               note=f"{served16} tokens/s whole, {stream16} streamed"),
        Metric("served x16 / served x1", scale, "", ">= 1.5", check(scale, ">=", 1.5),
               note=f"{served1} tokens/s at 1 client"),
        Metric("TTFT streamed / raw prefill + 1 token", ttft_ratio, "", "<= 1.2",
               check(ttft_ratio, "<=", 1.2),
               note=f"{_ms(ttft)} ms vs {_ms(prefill)} ms, medians over "
                    f"{len(answered)} requests, interleaved"),
        Metric("TTFT streamed / raw prefill + 1 token, first token is text", texty_ratio, "",
               "<= 1.2", check(texty_ratio, "<=", 1.2),
               note=f"{_ms(texty_ttft)} ms vs {_ms(texty_prefill)} ms, {len(texty)} requests"),
        Metric("TTFT streamed / raw first text", text_ratio, "", "<= 1.2",
               check(text_ratio, "<=", 1.2),
               note=f"{_ms(ttft)} ms vs {_ms(first_text)} ms (same held-back tokens)"),
        Metric("first text: served less raw, per request (median)", _ms(added), "ms"),
        Metric("single client served / raw", single_ratio, "", ">= 0.9",
               check(single_ratio, ">=", 0.9), note=f"raw {single:.1f} tokens/s"),
        Metric("errors", errors, "", "0", errors == 0),
        Metric("load average (start, end)", f"{load_start[0]} -> {load_end[0]}", ""),
    )  # fmt: skip
    result.tables["raw engine: batched ceiling by engine_max_batch_size"] = sweep
    result.tables["served through the front door"] = [
        {k: v for k, v in r.items() if k != "error_kinds" or v} for r in rows
    ]
    result.tables["time to first token: served (1 client) and raw, interleaved"] = (
        first_token_table(firsts)
    )
    result.tables["roofline"] = roofline(model.onnx_int4_dir, bandwidth, sweep, single)
    result.details = {
        "engine_threads": threads or "one per core",
        "tokens_per_request": tokens,
        "ceiling_turns": CEILING_TURNS,
        "repeats": repeats,
        "loadavg_start": load_start,
        "loadavg_end": load_end,
        "raw": raw,
        "raw_after": raw_after,
        "first_tokens": firsts,
        "bandwidth": bandwidth,
        "onnx_dir": str(model.onnx_int4_dir),
    }
    result.wall_s = wall_s
    return result


def roofline(
    onnx_dir: Path, bandwidth: dict[str, float], sweep: list[dict[str, Any]], single: float
) -> list[dict[str, Any]]:
    """Per generation step: the weights read once (the memory floor) against the measured step
    time, for one turn alone and each batch size's ceiling."""
    files, per_step = step_bytes(onnx_dir)
    traffic = bandwidth["copy_traffic_bytes_per_s"]
    floor_ms = 1000 * per_step / traffic
    rows = [
        {"what": "int4 model files", "value": round(files / 1e6, 1), "unit": "MB"},
        {"what": "read per step (files less the fp32 input embedding)",
         "value": round(per_step / 1e6, 1), "unit": "MB"},
        {"what": "memory traffic, numpy copyto (read + write, 1 thread)",
         "value": round(traffic / 1e9, 2), "unit": "GB/s"},
        {"what": "memory read, numpy sum (1 thread)",
         "value": round(bandwidth["sum_read_bytes_per_s"] / 1e9, 2), "unit": "GB/s"},
        {"what": "memory floor per step (read per step / copy traffic)",
         "value": round(floor_ms, 1), "unit": "ms"},
        {"what": "step time, one turn alone", "value": round(1000 / single, 1), "unit": "ms",
         "note": f"{single * per_step / 1e9:.2f} GB/s of weights"},
    ]  # fmt: skip
    base = next(e for e in sweep if e["engine_max_batch_size"] == 1)["tokens/s (median)"]
    for entry in sweep:
        batch, rate = entry["engine_max_batch_size"], entry["tokens/s (median)"]
        rows.append(
            {
                "what": f"step time at batch {batch} (ceiling run)",
                "value": round(1000 * batch / rate, 1),
                "unit": "ms",
                "note": f"{rate} tokens/s = {rate / base:.2f}x batch 1; if memory-bound: {batch}x",
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16 tokens, one repeat")
    parser.add_argument("--tokens", type=int, default=None, help="tokens per request")
    parser.add_argument(
        "--engine-threads", type=int, default=None,
        help="onnxruntime intra-op threads, raw and served (default: one per core)",
    )  # fmt: skip
    args = parser.parse_args()
    result = run(quick=args.quick, tokens=args.tokens, threads=args.engine_threads)
    print(write_results(result).with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
