"""Loading and greedy/sampled generation on onnxruntime-genai, shared by both ONNX pyfuncs.

The two models-from-code files (`onnx_prompt_model.py`, `onnx_chat_model.py`) log this file
with them through MLflow's `code_paths`, so a served model carries the exact generation loop it
was validated with and needs no slmops installed. Dependencies: mlflow and onnxruntime-genai.

Served requests go through one `og.Engine` per loaded model (`SharedEngine`): MLflow's scoring
server calls `predict` in worker threads, and the engine batches the turns in flight. One thread
owns the engine (`engine.run` and every request call); callers submit turns and read their
tokens from a per-turn queue. On CPU, onnxruntime-genai 0.18 offers only its *static* batching
scheduler (dynamic batching needs a paged-attention export, CUDA/WebGPU only): turns are
batched in waves of up to `max_batch_size`, and a turn that arrives mid-wave starts with the
next wave. `OnnxGenerator.generate` keeps the one-generator-per-call loop: the reference that
validation's runtime comparison and the tests hold the engine's answers to.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException

ARTIFACT_KEY = "onnx_model"  # the model's own copy of the folder (a model logged alone)
ONNX_URI_KEY = "onnx_model_uri"  # model_config key: the release's one stored folder
DEFAULT_MAX_NEW_TOKENS = 300
DEFAULT_TEMPERATURE = 0.0
# model_config keys of the shared engine, and their defaults. 4 turns per batch is what
# onnxruntime-genai configures on CPU by itself; the token budget (prompt + generated, per turn)
# also sizes each batch slot's key-value cache, so the model's full context would reserve
# batch x context of cache up front.
MAX_BATCH_SIZE_KEY = "engine_max_batch_size"
TOKEN_BUDGET_KEY = "engine_token_budget"
DEFAULT_MAX_BATCH_SIZE = 4
DEFAULT_TOKEN_BUDGET = 2048
# onnxruntime's intra-op threads per step. Unset (and not set by the folder's genai_config), a
# model gets one per core this process may run on: onnxruntime-genai 0.18 left alone runs one
# thread on this 2-core machine (measured on Phi-3-mini's int4 twin: 260 ms per token on its
# own, 170 ms with 2 threads).
THREADS_KEY = "engine_threads"


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, which containers narrow)."""
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def onnx_folder(artifacts: dict[str, str] | None, config: dict[str, Any]) -> Path:
    """The onnxruntime-genai folder: the model's own artifact, or the release's shared one.

    A release stores its ONNX folder once and both ONNX wrappers name it in `model_config`
    (`onnx_model_uri`); for a local artifact store this resolves to the stored folder itself.
    """
    if artifacts and ARTIFACT_KEY in artifacts:
        return Path(artifacts[ARTIFACT_KEY])
    uri = config.get(ONNX_URI_KEY)
    if not uri:
        raise MlflowException.invalid_parameter_value(
            f"the model has neither an '{ARTIFACT_KEY}' artifact nor an '{ONNX_URI_KEY}' in its "
            "model_config: it cannot find its ONNX folder"
        )
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=str(uri)))


class OnnxGenerator:
    """One loaded onnxruntime-genai model, its tokenizer and its shared engine.

    The model is shared read-only; `generate` gives each call its own generator, `submit` hands
    the turn to the one engine (started on first use). Tokenizer calls are serialized: not
    documented as thread-safe, and cheap.
    """

    def __init__(
        self,
        folder: Path,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        token_budget: int = DEFAULT_TOKEN_BUDGET,
        threads: int | None = None,
    ) -> None:
        import onnxruntime_genai as og

        genai_config = json.loads((folder / "genai_config.json").read_text())
        self.folder = folder
        # Prompt + generated tokens of one turn: the model's context, or the smaller budget
        # (which sizes each batch slot's KV cache).
        model_context = int(genai_config["model"]["context_length"])
        self.context_length = min(model_context, token_budget)
        # What the limit is, for error messages: users know the model's context, not our budget.
        self.context_limit = (
            f"the model's context is {model_context}"
            if self.context_length == model_context
            else f"this server's token budget is {token_budget} "
            f"(generation.engine_token_budget; the model's context is {model_context})"
        )
        self.max_batch_size = max_batch_size
        overlay: dict[str, Any] = {
            "engine": {"static_batching": {"max_batch_size": max_batch_size}},
            "search": {"max_length": self.context_length},
        }
        session_options = genai_config["model"]["decoder"].get("session_options") or {}
        if threads is None and "intra_op_num_threads" not in session_options:
            threads = available_cores()
        if threads is not None:
            overlay["model"] = {"decoder": {"session_options": {"intra_op_num_threads": threads}}}
        self.threads = threads or int(session_options["intra_op_num_threads"])
        config = og.Config(str(folder))
        config.overlay(json.dumps(overlay))
        self._model = og.Model(config)
        self._tokenizer = og.Tokenizer(self._model)
        self.eos_ids = frozenset(int(t) for t in self._tokenizer.eos_token_ids)
        self._tokenizer_lock = threading.Lock()
        self._engine: SharedEngine | None = None
        self._engine_lock = threading.Lock()

    @classmethod
    def from_config(cls, folder: Path, config: dict[str, Any]) -> OnnxGenerator:
        """Built with the engine settings of a model's `model_config` (defaults otherwise)."""
        return cls(
            folder,
            max_batch_size=int(config.get(MAX_BATCH_SIZE_KEY) or DEFAULT_MAX_BATCH_SIZE),
            token_budget=int(config.get(TOKEN_BUDGET_KEY) or DEFAULT_TOKEN_BUDGET),
            threads=int(config[THREADS_KEY]) if config.get(THREADS_KEY) else None,
        )

    @property
    def engine(self) -> SharedEngine:
        with self._engine_lock:
            if self._engine is None:
                self._engine = SharedEngine(self._model)
                # The engine's thread holds the model: without this, a model loaded once (by
                # MLflow checking an input example while logging, by a test) would keep its
                # weights for the life of the process.
                weakref.finalize(self, self._engine.close)
            return self._engine

    def submit_many(self, specs: Sequence[TurnSpec]) -> list[Turn]:
        """Several turns handed to the engine at once (they start in one batch if it has room)."""
        return self.engine.submit_many(specs)

    def submit(
        self,
        input_ids: Sequence[int],
        max_new_tokens: int,
        temperature: float = 0.0,
        *,
        top_p: float | None = None,
        top_k: int | None = None,
    ) -> Turn:
        """Start generating for `input_ids` on the shared engine; read the tokens from the turn."""
        return self.engine.submit(
            TurnSpec(list(input_ids), max_new_tokens, temperature, top_p=top_p, top_k=top_k)
        )

    def encode(self, text: str) -> list[int]:
        with self._tokenizer_lock:
            return [int(i) for i in self._tokenizer.encode(text)]

    def chat_prompt(self, messages: Sequence[dict[str, str]]) -> str:
        """The model's own chat template applied, ready for generation."""
        with self._tokenizer_lock:
            return str(
                self._tokenizer.apply_chat_template(
                    json.dumps(list(messages)), add_generation_prompt=True
                )
            )

    def decode(self, tokens: Sequence[int]) -> str:
        """The text of generated tokens, end tokens left out."""
        with self._tokenizer_lock:
            text = self._tokenizer.decode([t for t in tokens if t not in self.eos_ids])
        # The first new token's word-start marker decodes as a space (MLflow's transformers
        # output lstrips it too).
        return str(text).lstrip()

    def generate(
        self,
        input_ids: Sequence[int],
        max_new_tokens: int,
        temperature: float = 0.0,
        *,
        top_p: float | None = None,
        top_k: int | None = None,
        stop: Callable[[list[int]], bool] | None = None,
    ) -> list[int]:
        """New tokens for `input_ids` (greedy at temperature 0), up to `max_new_tokens` or the
        context; `stop(new_tokens)` may end it early."""
        import numpy as np
        import onnxruntime_genai as og

        search: dict[str, Any] = {
            "max_length": min(len(input_ids) + max_new_tokens, self.context_length),
            "do_sample": temperature > 0,
        }
        if temperature > 0:
            search["temperature"] = temperature
            if top_p is not None:
                search["top_p"] = top_p
            if top_k is not None:
                search["top_k"] = top_k
        params = og.GeneratorParams(self._model)
        params.set_search_options(**search)
        generator = og.Generator(self._model, params)
        generator.append_tokens(np.asarray(input_ids, dtype=np.int32))
        new_tokens: list[int] = []
        while not generator.is_done():
            generator.generate_next_token()
            new_tokens.append(int(generator.get_next_tokens()[0]))
            if stop is not None and stop(new_tokens):
                break
        del generator
        return new_tokens


@dataclass(frozen=True)
class TurnSpec:
    """What one turn generates: greedy at temperature 0."""

    input_ids: list[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    min_new_tokens: int = 0  # end tokens masked until then (benchmarks: a fixed length)


class EngineFailure(RuntimeError):
    """The engine failed a turn (or the whole batch it was in)."""


_DONE = object()


@dataclass(eq=False)  # turns are told apart by identity
class Turn:
    """One submitted turn: iterate it for token ids as the engine makes them.

    After the iteration ends, `finish_reason` is "stop" (an end token), "length" (the token
    budget or the context) or "cancelled", and `ended_by_eos` says whether an end token ended it
    (the engine does not hand that token over; it counts in the usage, as with `generate`).
    """

    spec: TurnSpec
    submitted: float = field(default_factory=time.monotonic)
    finish_reason: str | None = None
    ended_by_eos: bool = False
    error: str | None = None
    _events: queue.SimpleQueue[Any] = field(default_factory=queue.SimpleQueue)
    _engine: SharedEngine | None = None
    _cancelled: bool = False

    def __iter__(self) -> Iterator[int]:
        while True:
            item = self._events.get()
            if item is _DONE:
                break
            yield item
        if self.error is not None:
            raise EngineFailure(self.error)

    def cancel(self) -> None:
        """Stop generating (idempotent): the engine frees the turn's batch slot."""
        if not self._cancelled and self.finish_reason is None and self._engine is not None:
            self._cancelled = True
            self._engine.cancel(self)


class SharedEngine:
    """One `og.Engine` over a loaded model, driven by its own thread.

    Every engine call happens on that thread: callers put work in its inbox (`submit`,
    `cancel`) and read their turn's tokens from the turn's queue, so concurrent callers never
    touch onnxruntime-genai's request objects themselves.
    """

    def __init__(self, model: Any, event_capacity: int = 256) -> None:
        import onnxruntime_genai as og

        self._og = og
        self._inbox: queue.SimpleQueue[tuple[str, list[Turn]]] = queue.SimpleQueue()
        self._active: dict[int, tuple[Any, int, Turn]] = {}  # id(og request) -> (req, turn, ..)
        self._by_turn: dict[int, int] = {}  # id(Turn) -> id(og request)
        # Turns beyond `max_batch_size` wait here, not in the engine: onnxruntime-genai 0.18's
        # CPU (static) scheduler forms batches of 4 whatever `max_batch_size` says (measured
        # with 1, 2, 3, 5, 8, 16), so the limit is kept here; above 4 it is 4.
        self._waiting: collections.deque[Turn] = collections.deque()
        self._lock = threading.Lock()
        self.max_batch_size = 0
        self.largest_batch = 0  # the most turns one engine step has generated for
        # Engine steps by how many turns they generated for: steps below `max_batch_size` while
        # turns wait are throughput lost to a wave that started short (see `health`).
        self.steps_by_batch: collections.Counter[int] = collections.Counter()
        self.finished: collections.Counter[str] = collections.Counter()  # turns, by how they ended
        # onnxruntime-genai binds an engine to the thread that created it: its thread builds it.
        started: queue.SimpleQueue[BaseException | None] = queue.SimpleQueue()
        self._thread = threading.Thread(
            target=self._own, args=(model, event_capacity, started), name="og-engine", daemon=True
        )
        self._thread.start()
        error = started.get()
        if error is not None:
            raise error

    def _own(self, model: Any, event_capacity: int, started: queue.SimpleQueue[Any]) -> None:
        try:
            self._engine = self._og.Engine(model)
            capabilities = self._engine.get_capabilities()
            self.max_batch_size = int(capabilities.configured_max_batch_size)
            self._buffer = self._engine.create_event_buffer(event_capacity)
        except BaseException as error:
            started.put(error)
            return
        started.put(None)
        self._loop()

    @property
    def in_flight(self) -> int:
        """Turns submitted and not finished (generating, or waiting for a batch slot)."""
        with self._lock:
            return len(self._active) + len(self._waiting) + self._inbox.qsize()

    def health(self) -> dict[str, Any]:
        """Turns in flight, turns finished by how they ended ("cancelled", "stop", ...), and
        engine steps by the turns they generated for (`{"4": 448, "1": 64}`): the batching
        actually achieved, which the turns in flight alone do not show."""
        with self._lock:
            finished = dict(self.finished)
            steps = {str(size): count for size, count in sorted(self.steps_by_batch.items())}
        return {"in_flight": self.in_flight, "finished": finished, "steps_by_batch": steps}

    def submit(self, spec: TurnSpec) -> Turn:
        (turn,) = self.submit_many([spec])
        return turn

    def submit_many(self, specs: Sequence[TurnSpec]) -> list[Turn]:
        """Turns that reach the engine together, so they start in the same batch when it has
        room (the rows of one request, the choices of one completion)."""
        turns = [Turn(spec=spec, _engine=self) for spec in specs]
        self._inbox.put(("begin", turns))
        return turns

    def cancel(self, turn: Turn) -> None:
        self._inbox.put(("cancel", [turn]))

    def close(self) -> None:
        """End the engine's thread once it is idle; it lets go of the engine and the model."""
        self._inbox.put(("close", []))

    def _loop(self) -> None:
        closing = False
        while True:
            busy = self._engine.has_pending_requests()
            try:
                command = self._inbox.get(block=not busy)
            except queue.Empty:
                command = None
            while command is not None:
                if command[0] == "close":
                    closing = True
                else:
                    # A failing cancel (a turn that just ended) has nothing to undo; `_begin`
                    # fails its own turn.
                    with contextlib.suppress(Exception):
                        self._handle(*command)
                try:
                    command = self._inbox.get_nowait()
                except queue.Empty:
                    command = None
            if self._engine.has_pending_requests():
                self._step()
            elif closing:
                del self._buffer, self._engine
                return

    def _handle(self, verb: str, turns: list[Turn]) -> None:
        if verb == "begin":
            with self._lock:
                self._waiting.extend(turns)
            self._admit()
            return
        (turn,) = turns
        with self._lock:
            waiting = turn in self._waiting
            if waiting:
                self._waiting.remove(turn)
        if waiting:
            self._finish(turn, "cancelled")
            return
        with self._lock:
            key = self._by_turn.get(id(turn))
            entry = self._active.get(key) if key is not None else None
        if entry is not None:
            request, turn_id, _ = entry
            request.cancel_turn(turn_id)  # a CANCELLED event follows on the next run

    def _begin(self, turn: Turn) -> None:
        import numpy as np

        og = self._og
        if turn._cancelled:  # cancelled before it reached the engine
            self._finish(turn, "cancelled")
            return
        spec = turn.spec
        try:
            request = self._engine.create_request()
            options = og.TurnOptions(request)
            options.set_max_generated_tokens(spec.max_new_tokens)
            if spec.min_new_tokens:
                options.set_min_generated_tokens(spec.min_new_tokens)
            if spec.temperature > 0:
                options.set_do_sample(True)
                options.set_temperature(spec.temperature)
                if spec.top_p is not None:
                    options.set_top_p(spec.top_p)
                if spec.top_k is not None:
                    options.set_top_k(spec.top_k)
            else:
                options.set_do_sample(False)
            turn_id = request.begin_turn(np.asarray(spec.input_ids, dtype=np.int32), options)
        except Exception as error:  # a turn the engine refuses fails alone
            turn.error = f"{type(error).__name__}: {error}"
            self._finish(turn, "error")
            return
        with self._lock:
            self._active[id(request)] = (request, turn_id, turn)
            self._by_turn[id(turn)] = id(request)

    def _step(self) -> None:
        og = self._og
        try:
            events = self._engine.run(self._buffer)
        except Exception as error:  # the whole batch fails; the engine goes on with new turns
            with self._lock:
                entries = list(self._active.values())
            for request, _, turn in entries:
                turn.error = f"{type(error).__name__}: {error}"
                self._close(request, turn, "error")
            return
        token_flag, finished_flag = (
            int(og.EngineEventFlags.TOKEN),
            int(og.EngineEventFlags.TURN_FINISHED),
        )
        failed_flag = int(og.EngineEventFlags.FAILED)
        generating = {
            id(events[i].request) for i in range(len(events)) if int(events[i].flags) & token_flag
        }
        self.largest_batch = max(self.largest_batch, len(generating))
        if generating:
            with self._lock:
                self.steps_by_batch[len(generating)] += 1
        for index in range(len(events)):
            event = events[index]
            with self._lock:
                entry = self._active.get(id(event.request))
            if entry is None:
                continue
            request, _, turn = entry
            flags = int(event.flags)
            if flags & token_flag and event.token is not None:
                turn._events.put(int(event.token))
            if flags & failed_flag:
                turn.error = f"the engine failed the turn: {event.error_code}"
                self._close(request, turn, "error")
            elif flags & finished_flag:
                reason = event.finish_reason
                turn.ended_by_eos = reason == og.FinishReason.EOS
                if reason in (og.FinishReason.EOS, og.FinishReason.STOP_STRING):
                    finish = "stop"
                elif reason == og.FinishReason.CANCELLED:
                    finish = "cancelled"
                else:
                    finish = "length"
                self._close(request, turn, finish)

    def _close(self, request: Any, turn: Turn, finish: str) -> None:
        with self._lock:
            self._active.pop(id(request), None)
            self._by_turn.pop(id(turn), None)
        try:
            request.close()
        finally:
            self._finish(turn, finish)
        self._admit()

    def _admit(self) -> None:
        """Hand waiting turns to the engine while it has batch slots."""
        while True:
            with self._lock:
                if not self._waiting or len(self._active) >= self.max_batch_size:
                    return
                turn = self._waiting.popleft()
            self._begin(turn)

    def _finish(self, turn: Turn, finish: str) -> None:
        with self._lock:
            self.finished[finish] += 1
        turn.finish_reason = finish
        turn._events.put(_DONE)


@dataclass
class TextStream:
    """Text of a turn's tokens as it grows, for streaming: deltas that never need taking back.

    A tail that may be the start of a stop sequence, or an incomplete character, is held back
    until the next token decides it, so a stop sequence split across tokens (or chunks) never
    reaches the client. `stopped` is set once a stop sequence shows up; the text is then cut
    just before it.
    """

    decode: Callable[[list[int]], str]
    stops: Sequence[str] = ()
    tokens: list[int] = field(default_factory=list)
    emitted: str = ""
    stopped: bool = False

    def push(self, token: int) -> str:
        """Add one token; the new text that can be sent now (maybe "")."""
        self.tokens.append(token)
        text = self.decode(self.tokens)
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            return self._advance(text[: min(hits)])
        safe = len(text)
        if text.endswith("\ufffd"):  # half a multi-byte character
            safe = len(text.rstrip("\ufffd"))
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:size]):
                    safe = min(safe, len(text) - size)
                    break
        return self._advance(text[:safe])

    def finish(self) -> str:
        """The rest of the text once the turn has ended (the held-back tail, if not a stop)."""
        if self.stopped:
            return ""
        return self._advance(self.decode(self.tokens))

    @property
    def text(self) -> str:
        return self.emitted

    def _advance(self, text: str) -> str:
        if not text.startswith(self.emitted):
            # A decoder that rewrites earlier text (not seen with Phi-3's): send nothing for
            # now; `finish` sends whatever follows what was sent.
            return ""
        delta = text[len(self.emitted) :]
        self.emitted = text
        return delta


class TextTurn:
    """One turn on the shared engine, read as text: `deltas()` streams it, `run()` waits for it.

    Greedy answers equal `OnnxGenerator.generate` followed by `decode` and the stop-sequence
    cut, token for token, batched or not; `completion_tokens` counts the end token as
    `generate` does. A consumer that stops reading (a closed stream, a client gone) cancels the
    turn, which frees its batch slot.
    """

    def __init__(self, generator: OnnxGenerator, turn: Turn, stops: Sequence[str] = ()) -> None:
        self.turn = turn
        self.prompt_tokens = len(turn.spec.input_ids)
        self.stream = TextStream(generator.decode, tuple(stops))
        self.finish_reason: str | None = None
        self.completion_tokens = 0

    @classmethod
    def start(
        cls, generator: OnnxGenerator, specs: Sequence[TurnSpec], stops: Sequence[str] = ()
    ) -> list[TextTurn]:
        """Submit `specs` to the generator's engine together; read each as text."""
        return [cls(generator, turn, stops) for turn in generator.submit_many(specs)]

    def deltas(self) -> Iterator[str]:
        try:
            for token in self.turn:
                delta = self.stream.push(token)
                if delta:
                    yield delta
                if self.stream.stopped:
                    break
            else:
                tail = self.stream.finish()
                if tail:
                    yield tail
        finally:
            self.turn.cancel()  # a no-op once the turn has finished
        tokens = len(self.stream.tokens)
        if self.stream.stopped:
            self.finish_reason = "stop"
        else:
            self.finish_reason = self.turn.finish_reason or "length"
            tokens += int(self.turn.ended_by_eos)
        self.completion_tokens = tokens

    def run(self) -> str:
        for _ in self.deltas():
            pass
        return self.stream.text


# The token stream of a served model. `mlflow models serve` only calls `predict` (MLflow issue
# #12439: no streaming route), so a served ONNX chat model also answers on a second local port,
# given by the serve task in STREAM_PORT_VARIABLE: `POST /stream` with the `/invocations` chat
# body answers one JSON chunk per line (`predict_stream`'s chunks) as the engine makes them. It
# is the same process and the same engine as `/invocations`: one copy of the weights. A client
# that goes away cancels the generation (the next write fails, the stream is closed).
STREAM_PORT_VARIABLE = "SLMOPS_STREAM_PORT"
STREAM_PATH = "/stream"


def serve_token_stream(
    port: int,
    stream: Callable[[dict[str, Any]], Iterator[dict[str, Any]]],
    health: Callable[[], dict[str, Any]],
    host: str = "127.0.0.1",
) -> Any:
    """Serve `stream(request)` as newline-delimited JSON on `host:port`, in daemon threads;
    `GET /health` answers `health()` (the engine's turns in flight and finished by reason)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from mlflow.exceptions import MlflowException as _MlflowException

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # the end of the body is the end of the connection
        # Each chunk is a small write of its own, sent as the engine makes it: Nagle's
        # algorithm would hold one back until the previous one is acknowledged.
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass  # uvicorn's log is the server's log

        def do_GET(self) -> None:  # noqa: N802
            if self.path != "/health":
                self._answer(404, {"message": f"no route {self.path}"})
                return
            self._answer(200, {"status": "ok", **health()})

        def do_POST(self) -> None:  # noqa: N802
            if self.path != STREAM_PATH:
                self._answer(404, {"message": f"no route {self.path}"})
                return
            try:
                length = int(self.headers.get("Content-Length") or 0)
                request = json.loads(self.rfile.read(length))
                chunks = stream(request)
                first = next(chunks)  # a bad request fails here, before any 200
            except _MlflowException as error:
                self._answer(400, {"error_code": error.error_code, "message": error.message})
                return
            except (ValueError, TypeError) as error:
                self._answer(400, {"error_code": "BAD_REQUEST", "message": str(error)})
                return
            except Exception as error:
                self._answer(500, {"error_code": "INTERNAL_ERROR", "message": str(error)})
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/x-ndjson")
            self.end_headers()
            try:
                for chunk in itertools.chain([first], chunks):
                    self.wfile.write(json.dumps(chunk).encode() + b"\n")
                    self.wfile.flush()
            except OSError:
                pass  # the client went away: closing the stream cancels the generation
            finally:
                chunks.close()  # type: ignore[attr-defined]

        def _answer(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="token-stream", daemon=True).start()
    return server
