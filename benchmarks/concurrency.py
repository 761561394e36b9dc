"""(e) Concurrent clients against each served model: throughput, p50/p99 latency, errors.

1, 4 and 16 client threads (each with its own httpx client) send requests to
`http://127.0.0.1:<port>/invocations` until a request budget is spent or a time budget runs
out (requests in flight then finish; the client timeout bounds them). A non-200 answer, a
timeout or a connection error counts as an error; MLflow's server answers 504 after its
60 s request timeout.

Models: the tiny Phi-3 served by a release run (always) and the mid-size model logged and
served with the project's tasks (not with --quick).

    python -m benchmarks.concurrency [--quick] [--clients 1,4,16] [--budget-s S]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from benchmarks.recording import Metric, PartResult, percentile, write_results
from benchmarks.served import (
    ServedModel,
    request_body,
    serving_midsize,
    serving_release,
)
from offline_kit.tiny_model import chat_prompt

QUESTIONS = (
    "What is the capital of Spain?",
    "Write a short poem about the sea.",
    "What color is the sky?",
    "Explain machine learning, models, data, training, validation, serving and registry.",
)
CLIENT_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Outcome:
    latency_s: float
    status: int | None  # None: no HTTP answer
    error: str = ""


def load(model: ServedModel, clients: int, max_requests: int, budget_s: float) -> dict[str, Any]:
    """`clients` threads share `max_requests` requests, issuing none after `budget_s`."""
    tickets = itertools.count()
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    deadline = time.perf_counter() + budget_s

    def worker(index: int) -> None:
        with httpx.Client(timeout=CLIENT_TIMEOUT_S) as client:
            while time.perf_counter() < deadline:
                with lock:
                    ticket = next(tickets)
                if ticket >= max_requests:
                    return
                question = QUESTIONS[ticket % len(QUESTIONS)]
                body = request_body(
                    model, chat_prompt(question), [{"role": "user", "content": question}]
                )
                t0 = time.perf_counter()
                try:
                    response = client.post(f"{model.url}/invocations", json=body)
                    outcome = Outcome(
                        time.perf_counter() - t0,
                        response.status_code,
                        "" if response.status_code == 200 else response.text[:200],
                    )
                except httpx.HTTPError as error:
                    outcome = Outcome(time.perf_counter() - t0, None, type(error).__name__)
                with lock:
                    outcomes.append(outcome)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    ok = [o.latency_s for o in outcomes if o.status == 200]
    errors = [o for o in outcomes if o.status != 200]
    kinds = sorted({f"{o.status or ''} {o.error[:60]}".strip() for o in errors})
    return {
        "model": model.label,
        "clients": clients,
        "requests": len(outcomes),
        "ok": len(ok),
        "errors": len(errors),
        "throughput_rps": round(len(ok) / wall, 2) if wall else None,
        "p50_ms": _ms(percentile(ok, 50)),
        "p99_ms": _ms(percentile(ok, 99)),
        "max_ms": _ms(max(ok) if ok else None),
        "wall_s": round(wall, 1),
        "error_kinds": "; ".join(kinds),
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(1000 * seconds, 1)


def measure(
    models: Sequence[ServedModel],
    levels: Sequence[int],
    per_client: int,
    budget_s: float,
    result: PartResult,
) -> None:
    rows = result.tables.setdefault("per model and client count", [])
    for model in models:
        load(model, 1, 1, budget_s)  # warm-up
        base: dict[str, Any] | None = None
        for clients in levels:
            row = load(model, clients, clients * per_client, budget_s)
            rows.append(row)
            base = base or row
            scale = (
                round(row["throughput_rps"] / base["throughput_rps"], 2)
                if row["throughput_rps"] and base["throughput_rps"]
                else None
            )
            result.add(
                Metric(
                    f"{model.label} x{clients}: throughput",
                    row["throughput_rps"],
                    "req/s",
                    note=f"{scale}x of 1 client" if clients != levels[0] else "",
                ),
                Metric(
                    f"{model.label} x{clients}: p50 / p99",
                    f"{row['p50_ms']} / {row['p99_ms']}",
                    "ms",
                ),
                Metric(
                    f"{model.label} x{clients}: errors",
                    f"{row['errors']}/{row['requests']}",
                    target="0",
                    met=row["errors"] == 0,
                    note=row["error_kinds"],
                ),
            )


def run(
    quick: bool = False,
    levels: Sequence[int] = (1, 4, 16),
    budget_s: float | None = None,
    release: list[ServedModel] | None = None,
    midsize: list[ServedModel] | None = None,
) -> PartResult:
    """Load the release's served models and the mid-size ones (started here unless given)."""
    result = PartResult("concurrency", "(e) Concurrent requests to the served models", quick=quick)
    t0 = time.perf_counter()
    budget_s = budget_s or (8.0 if quick else 30.0)
    per_client = 2 if quick else 8
    with contextlib.ExitStack() as stack:
        models = release if release is not None else stack.enter_context(serving_release())
        measure(models, levels, per_client, budget_s, result)
        if not quick:
            mid = midsize if midsize is not None else stack.enter_context(serving_midsize())
            measure(mid, levels, 3, budget_s, result)
    result.details = {"levels": list(levels), "budget_s": budget_s, "per_client": per_client}
    result.wall_s = time.perf_counter() - t0
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, small budgets")
    parser.add_argument("--clients", default="1,4,16", help="client counts (default 1,4,16)")
    parser.add_argument("--budget-s", type=float, default=None, help="seconds per level")
    args = parser.parse_args()
    levels = tuple(int(c) for c in args.clients.split(","))
    result = run(quick=args.quick, levels=levels, budget_s=args.budget_s)
    print(write_results(result).with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
