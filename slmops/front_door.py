"""OpenAI-compatible front door for the served chat models: `/v1/chat/completions`, `/v1/models`.

`mlflow models serve` offers only `/invocations` (MLflow's scoring protocol), so an OpenAI client
cannot call it. MLflow's own answer, `mlflow gateway start` with the `mlflow-model-serving`
provider (deprecated, still in MLflow 3.17.2: `mlflow/gateway/providers/mlflow.py`), is not an
honest front door for our chat models: its chat route sends `{"inputs": [first message content]}`
to `/invocations`, answers 422 to any conversation of more than one message (so no system
prompt, no history), sends a bare string where our models expect `messages` (so no chat
template), and returns `finish_reason: null` and empty `usage` although both models compute them.

Both of our chat wrappers (the transformers `llm/v1/chat` pipeline and the onnxruntime-genai
chat pyfunc) already take and return OpenAI chat completions at `/invocations`. So this is the
smallest shim that keeps that contract intact: it validates the OpenAI request, refuses what it
cannot do honestly (tools, sampling knobs it does not forward), forwards `messages`,
`max_tokens`, `temperature`, `stop` and `n` unchanged, and unwraps the completion. vLLM's
`min_tokens` and `ignore_eos` (fixed-length generations, for load tests) reach the ONNX chat
model through its token stream only: `/invocations` drops inputs outside the signature, so
elsewhere they are refused. Which server answers for a model is re-read from its state file
`<servers_dir>/<name>.json` on every request, so a blue/green switch by the release flow is
picked up at once and the front door's own address never changes.

Streaming (`stream: true`, server-sent events in OpenAI's chunk format). MLflow's scoring server
cannot stream (MLflow issue #12439), so the served ONNX chat model also exposes its engine's
token stream on a second local port of the same process (`ServerHandle.stream_port`, assigned by
the serve task; one copy of the weights): the front door relays those chunks as they come, and
sends the ONNX model's requests (n=1) through that stream even when not streaming, so that a
deadline or a client that goes away cancels the generation. The transformers wrapper has no
token stream (it would need a second copy of the model in the server): `stream: true` gets its
whole answer as chunks, with the header `X-Slmops-Streaming: whole-answer` (token streams say
`tokens`).

Limits, per served model: `max_concurrency` requests in flight (`max_concurrency_without_stream`
for a model without a token stream) and `max_queue` waiting; past
that, 429 with `Retry-After`. Each request has a deadline (`deadline_s`, queueing included):
past it, 504 (or an error event in a stream that has begun), and the ONNX generation is
cancelled. `/metrics` is Prometheus text; `/live` answers while the process runs, `/ready` when
every chat model's server answers `/ping` (its model is loaded). With an API key set
(`SLMOPS_FRONT_DOOR_API_KEY`), `/v1/*` needs `Authorization: Bearer <key>` (else 401).

Run it with `python -m slmops.front_door --servers-dir D --host 127.0.0.1 --port P`; limits come
from `SLMOPS_FRONT_DOOR_*` environment variables (`FrontDoorSettings`), read in `main`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import anyio
import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from slmops.config import WrapperKind
from slmops.servers import ServerHandle, model_servers

CHAT_KINDS = frozenset({WrapperKind.CHAT_TRANSFORMERS, WrapperKind.CHAT_ONNX})
# Accepted but not forwarded: it does not change what the model generates.
IGNORED_FIELDS = frozenset({"user"})
UPSTREAM_TIMEOUT_S = 300.0


# A chat model's server, as its state file (`slmops.servers`) names it.
Backend = ServerHandle


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")  # e.g. `name`: no effect on these models

    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """The OpenAI chat-completion fields this front door honours."""

    model_config = ConfigDict(extra="forbid")

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # the newer name of max_tokens
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    stop: str | list[str] | None = None
    n: int | None = Field(default=None, ge=1)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    # vLLM's extensions, for fixed-length generations (load tests, benchmarks): end tokens are
    # not generated before `min_tokens`; `ignore_eos` generates `max_tokens` whatever comes.
    min_tokens: int | None = Field(default=None, ge=0)
    ignore_eos: bool | None = None

    @property
    def fixes_length(self) -> bool:
        return bool(self.min_tokens) or bool(self.ignore_eos)

    def upstream_body(self) -> dict[str, Any]:
        """The `/invocations` body: only what the client gave, in the models' chat shape."""
        body: dict[str, Any] = {
            "messages": [{"role": m.role, "content": m.text()} for m in self.messages]
        }
        max_tokens = self.max_tokens or self.max_completion_tokens
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        if self.temperature is not None:
            body["temperature"] = self.temperature
        if self.stop:
            body["stop"] = self.stop
        # n=1 is every model's default; the transformers pipeline refuses an explicit `n`.
        if self.n is not None and self.n != 1:
            body["n"] = self.n
        if self.min_tokens:
            body["min_tokens"] = self.min_tokens
        if self.ignore_eos:
            body["ignore_eos"] = True
        return body


class FrontDoorError(Exception):
    """An OpenAI-style error answer."""

    def __init__(
        self,
        status: int,
        message: str,
        error_type: str,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.error_type, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def invalid_request(message: str, code: str = "invalid_request") -> FrontDoorError:
    return FrontDoorError(400, message, "invalid_request_error", code)


def served_chat_models(servers_dir: Path) -> dict[str, Backend]:
    """Registered name -> current server, for every chat model with a state file."""
    return {
        name: handle
        for name, handle in model_servers(servers_dir).items()
        if handle.kind in CHAT_KINDS
    }


def resolve_model(servers_dir: Path, model: str) -> Backend:
    """The server for `model`: a registered name, or a chat kind (`chat-onnx`) served once."""
    backends = served_chat_models(servers_dir)
    if model in backends:
        return backends[model]
    by_kind = [b for b in backends.values() if b.model_kind.value == model]
    if len(by_kind) == 1:
        return by_kind[0]
    served = ", ".join(sorted(backends)) or "none"
    if by_kind:
        message = f"model {model!r} is ambiguous here; use one of: {served}"
    else:
        message = f"the model {model!r} is not served here; served chat models: {served}"
    raise FrontDoorError(404, message, "invalid_request_error", "model_not_found")


def parse_request(payload: Any) -> ChatCompletionRequest:
    if not isinstance(payload, dict):
        raise invalid_request("the body must be a JSON object")
    known_fields = ChatCompletionRequest.model_fields.keys() | IGNORED_FIELDS
    unsupported = sorted(
        key for key, value in payload.items() if key not in known_fields and value is not None
    )
    if unsupported:
        raise invalid_request(
            f"unsupported parameter(s): {', '.join(unsupported)}; this endpoint takes model, "
            "messages, max_tokens (or max_completion_tokens), temperature, stop, n, stream, "
            "stream_options, min_tokens, ignore_eos",
            "unsupported_parameter",
        )
    known = {k: v for k, v in payload.items() if k in ChatCompletionRequest.model_fields}
    try:
        request = ChatCompletionRequest.model_validate(known)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise invalid_request(f"{where}: {first['msg']}") from exc
    if request.stream and request.n not in (None, 1):
        raise invalid_request("a streamed completion has one choice; send n=1", "stream_n")
    max_tokens = request.max_tokens or request.max_completion_tokens
    if request.min_tokens and max_tokens is not None and request.min_tokens > max_tokens:
        raise invalid_request(
            f"min_tokens ({request.min_tokens}) is more than max_tokens ({max_tokens})"
        )
    return request


def streams_tokens(backend: Backend, chat: ChatCompletionRequest) -> bool:
    """Whether the answer comes from the model's token stream: the ONNX chat model, n=1."""
    return backend.stream_url is not None and chat.n in (None, 1)


def check_generation_options(chat: ChatCompletionRequest, backend: Backend) -> None:
    """Refuse what the model would silently drop: `/invocations` ignores inputs outside the
    signature, so `min_tokens` and `ignore_eos` reach a model only through its token stream."""
    if chat.fixes_length and not streams_tokens(backend, chat):
        raise invalid_request(
            f"min_tokens and ignore_eos are honoured only by a model with a token stream and "
            f"one choice (n=1); {backend.name} would ignore them",
            "unsupported_parameter",
        )


def _upstream_error(response: httpx.Response, backend: Backend) -> FrontDoorError:
    """MLflow's `{error_code, message}` as an OpenAI error: 4xx stays 4xx, 5xx becomes 502."""
    try:
        body = response.json()
        message = str(body.get("message") or body)
        code = body.get("error_code")
    except (ValueError, AttributeError):
        message, code = response.text[:2000], None
    if 400 <= response.status_code < 500:
        return FrontDoorError(response.status_code, message, "invalid_request_error", code)
    return FrontDoorError(
        502, f"{backend.name} failed: {message}", "server_error", code or "upstream_error"
    )


def completion_from(body: Any, backend: Backend) -> dict[str, Any]:
    """The chat completion in an `/invocations` answer: `[c]` or `{"predictions": [c]}`."""
    predictions = body.get("predictions", body) if isinstance(body, dict) else body
    completion = predictions[0] if isinstance(predictions, list) and predictions else predictions
    if not isinstance(completion, dict) or not isinstance(completion.get("choices"), list):
        raise FrontDoorError(
            502,
            f"{backend.name} did not answer a chat completion: {str(body)[:500]}",
            "server_error",
            "upstream_error",
        )
    return completion


async def _invoke(
    client: httpx.AsyncClient, servers_dir: Path, backend: Backend, body: dict[str, Any]
) -> tuple[Backend, httpx.Response]:
    try:
        return backend, await client.post(f"{backend.url}/invocations", json=body)
    except httpx.TransportError as first_error:
        # The old server of a blue/green switch stops right after the state file names the
        # new one: a request that read the old address gets one more try at the current one.
        current = served_chat_models(servers_dir).get(backend.name)
        if current is None or current.url == backend.url:
            raise _unreachable(backend, first_error) from first_error
        try:
            return current, await client.post(f"{current.url}/invocations", json=body)
        except httpx.TransportError as exc:
            raise _unreachable(current, exc) from exc


def _unreachable(backend: Backend, error: httpx.TransportError) -> FrontDoorError:
    if isinstance(error, httpx.TimeoutException) and not isinstance(error, httpx.ConnectTimeout):
        return FrontDoorError(
            504, f"{backend.name} at {backend.url} timed out", "server_error", "upstream_timeout"
        )
    return FrontDoorError(
        503,
        f"{backend.name} is not reachable at {backend.url} ({type(error).__name__}); "
        "check `python -m flows.serve status`",
        "server_error",
        "model_unavailable",
    )


def _created(backend: Backend) -> int:
    try:
        return int(datetime.fromisoformat(backend.started_at).timestamp())
    except ValueError:
        return 0


class FrontDoorSettings(BaseModel):
    """Limits and access of the front door (environment: `SLMOPS_FRONT_DOOR_<FIELD>`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Per served model with a token stream (the ONNX chat model). 8 in flight = two of its
    # engine's batches of 4: while one batch generates, the next waits inside the engine and
    # starts at the step the first one ends. onnxruntime-genai 0.18's CPU scheduler batches in
    # waves and starts a wave with whatever turns it has: with only 4 in flight, the request
    # that arrives first after a wave ends starts the next wave alone and the other 3 wait a
    # whole wave for the one after (measured: every wave split 1 + 3; 16 clients got 0.86 of
    # the raw engine's throughput).
    max_concurrency: int = Field(default=8, ge=1)
    # Per served model without one (the transformers wrapper): its server answers one request
    # at a time and cannot cancel one it has started, so more in flight would only move the
    # queue out of reach of the deadline and of clients that leave (the others wait in its
    # thread pool).
    max_concurrency_without_stream: int = Field(default=4, ge=1)
    max_queue: int = Field(default=16, ge=0)
    deadline_s: float = Field(default=300.0, gt=0)  # queueing + generation, per request
    retry_after_s: int = Field(default=1, ge=1)
    api_key: str | None = None  # None: no key needed

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> FrontDoorSettings:
        values = {
            name: env[variable]
            for name in cls.model_fields
            if (variable := f"SLMOPS_FRONT_DOOR_{name.upper()}") in env and env[variable]
        }
        return cls.model_validate(values)


@dataclass
class ModelGate:
    """A served model's admission: `limit` requests in flight, `queue` more waiting."""

    limit: int
    queue: int
    retry_after_s: int = 1
    in_flight: int = 0
    waiting: int = 0
    _free: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def enter(self, timeout_s: float) -> None:
        """Take a slot; 429 when the queue is full, 504 when none frees up in time."""
        if self.in_flight >= self.limit and self.waiting >= self.queue:
            raise FrontDoorError(
                429,
                f"the model is busy ({self.in_flight} in flight, {self.waiting} waiting); "
                "retry later",
                "rate_limit_error",
                "overloaded",
                headers={"Retry-After": str(self.retry_after_s)},
            )
        self.waiting += 1
        try:
            async with self._free:
                await asyncio.wait_for(
                    self._free.wait_for(lambda: self.in_flight < self.limit), timeout_s
                )
                self.in_flight += 1
        except TimeoutError as exc:
            raise deadline_exceeded("waiting for a free slot") from exc
        finally:
            self.waiting -= 1

    async def leave(self) -> None:
        async with self._free:
            self.in_flight -= 1
            self._free.notify()


def deadline_exceeded(where: str) -> FrontDoorError:
    return FrontDoorError(
        504, f"the request's deadline passed {where}", "server_error", "deadline_exceeded"
    )


LABELS = ("model", "version", "alias")


class FrontDoorMetrics:
    """What `/metrics` shows, labelled by what answered: the registered model, the registry
    version its server serves and the alias it was served as (`champion`), from the server's
    state file. A request refused before a model was found has all three empty (a name a
    client made up never becomes a label value)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("slmops_requests", "Chat completion requests", LABELS, registry=r)
        self.errors = Counter(
            "slmops_request_errors", "Requests answered with an error, by HTTP status",
            (*LABELS, "code"), registry=r,
        )  # fmt: skip
        self.queue_depth = Gauge(
            "slmops_queue_depth", "Requests waiting for a slot", LABELS, registry=r
        )
        self.in_flight = Gauge("slmops_in_flight", "Requests being answered", LABELS, registry=r)
        self.ttft = Histogram(
            "slmops_time_to_first_token_seconds", "From arrival to the first content token",
            LABELS, registry=r,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )  # fmt: skip
        self.inter_token = Histogram(
            "slmops_inter_token_latency_seconds", "Between two streamed content chunks",
            LABELS, registry=r,
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        )  # fmt: skip
        self.generated_tokens = Counter(
            "slmops_generated_tokens", "Completion tokens generated", LABELS, registry=r
        )


def _labels(backend: Backend | None) -> dict[str, str]:
    if backend is None:
        return {"model": "", "version": "", "alias": ""}
    return {"model": backend.name, "version": backend.version, "alias": backend.alias}


def _chunk_head(chunk: Mapping[str, Any]) -> dict[str, Any]:
    return {k: chunk[k] for k in ("id", "created") if k in chunk}


async def _token_chunks(
    client: httpx.AsyncClient, backend: Backend, body: dict[str, Any]
) -> AsyncGenerator[dict[str, Any], None]:
    """The chunks of the model's token stream, as it sends them."""
    assert backend.stream_url is not None
    try:
        async with client.stream("POST", backend.stream_url, json=body) as response:
            if response.status_code != 200:
                await response.aread()
                raise _upstream_error(response, backend)
            async for line in response.aiter_lines():
                if line.strip():
                    yield json.loads(line)
    except httpx.TransportError as exc:
        raise _unreachable(backend, exc) from exc


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data)}\n\n"


def create_app(
    servers_dir: Path,
    transport: httpx.AsyncBaseTransport | None = None,
    settings: FrontDoorSettings | None = None,
) -> FastAPI:
    """The front door over the model servers recorded in `servers_dir`.

    Args:
        servers_dir: where `tasks.serving` keeps one state file per served model.
        transport: httpx transport to the model servers (tests pass a fake one).
        settings: limits and API key (defaults: `FrontDoorSettings()`, no key).
    """
    settings = settings or FrontDoorSettings()
    # One client for the app's life, not one per request: building one loads the CA bundle
    # (~40 ms of CPU on 2 cores, paid before the first token of every streamed answer). Still a
    # new connection per request, as before: a kept-alive one that the model server closes just
    # as it is reused would fail the request. No limit on connections: the gates limit what is
    # in flight. Closing a stream not read to its end closes its connection, which is what
    # cancels the model's generation.
    upstream = httpx.AsyncClient(
        transport=transport,
        timeout=UPSTREAM_TIMEOUT_S,
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=0),
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with upstream:
            yield

    app = FastAPI(
        title="slmops OpenAI-compatible front door",
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    metrics = FrontDoorMetrics()
    app.state.metrics = metrics
    gates: dict[str, ModelGate] = {}

    def gate_of(backend: Backend) -> ModelGate:
        if backend.name not in gates:
            limit = (
                settings.max_concurrency
                if backend.stream_url is not None
                else settings.max_concurrency_without_stream
            )
            gates[backend.name] = ModelGate(limit, settings.max_queue, settings.retry_after_s)
        return gates[backend.name]

    @app.exception_handler(FrontDoorError)
    async def _openai_error(request: Request, exc: FrontDoorError) -> JSONResponse:
        return exc.response()

    @app.middleware("http")
    async def _api_key(request: Request, call_next: Any) -> Response:
        needs_key = settings.api_key and request.url.path.startswith("/v1")
        if needs_key and request.headers.get("authorization") != f"Bearer {settings.api_key}":
            return FrontDoorError(
                401, "a valid API key is needed (Authorization: Bearer <key>)",
                "invalid_request_error", "invalid_api_key",
            ).response()  # fmt: skip
        response: Response = await call_next(request)
        return response

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "models": sorted(served_chat_models(servers_dir))}

    @app.get("/live")
    async def live() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        backends = served_chat_models(servers_dir)

        async def loaded(backend: Backend) -> bool:
            try:
                response = await upstream.get(f"{backend.url}/ping", timeout=5.0)
            except httpx.HTTPError:
                return False
            return response.status_code == 200

        states = await asyncio.gather(*(loaded(b) for b in backends.values()))
        models = dict(zip(backends, states, strict=True))
        ok = bool(models) and all(models.values())
        return JSONResponse(
            {"status": "ready" if ok else "not ready", "models": models},
            status_code=200 if ok else 503,
        )

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        data = [
            {"id": name, "object": "model", "created": _created(b), "owned_by": "slmops"}
            for name, b in served_chat_models(servers_dir).items()
        ]
        return {"object": "list", "data": data}

    @app.get("/v1/models/{model}")
    async def get_model(model: str) -> dict[str, Any]:
        backend = resolve_model(servers_dir, model)
        return {"id": model, "object": "model", "created": _created(backend), "owned_by": "slmops"}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> Any:
        started = time.monotonic()
        backend = None
        try:
            try:
                payload = json.loads(await request.body())
            except ValueError as exc:
                raise invalid_request(f"the body is not JSON: {exc}") from exc
            chat = parse_request(payload)
            backend = resolve_model(servers_dir, chat.model)
            check_generation_options(chat, backend)
            labels = _labels(backend)
            metrics.requests.labels(**labels).inc()
            gate = gate_of(backend)
            metrics.queue_depth.labels(**labels).inc()
            try:
                await gate.enter(settings.deadline_s)
            finally:
                metrics.queue_depth.labels(**labels).dec()
            metrics.in_flight.labels(**labels).inc()
            answer = _Answer(
                chat, backend, labels, started + settings.deadline_s, started, upstream, metrics
            )

            async def release() -> None:
                metrics.in_flight.labels(**labels).dec()
                await gate.leave()

            if chat.stream:
                return await answer.stream(request, servers_dir, release)
            try:
                return await answer.whole(servers_dir)
            finally:
                await release()
        except FrontDoorError as error:
            metrics.errors.labels(**_labels(backend), code=str(error.status)).inc()
            raise

    return app


class _ClosingStreamingResponse(StreamingResponse):
    """A streaming response that closes its events however it ends.

    When the client has gone, Starlette stops at the next send (`ClientDisconnect`) and leaves
    the events generator suspended: its cleanup (cancel the generation, free the slot) would
    wait for the garbage collector, which, in a reference cycle, can be never soon enough.
    """

    def __init__(self, events: AsyncGenerator[str, None], **kwargs: Any) -> None:
        super().__init__(events, **kwargs)
        self._events = events

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self._events.aclose()


@dataclass
class _Answer:
    """One admitted chat request: answered whole or streamed, within its deadline."""

    chat: ChatCompletionRequest
    backend: Backend
    labels: dict[str, str]
    deadline: float  # time.monotonic()
    started: float
    client: httpx.AsyncClient  # the app's, shared
    metrics: FrontDoorMetrics

    @property
    def tokens_streamed(self) -> bool:
        return streams_tokens(self.backend, self.chat)

    def remaining(self) -> float:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise deadline_exceeded("before the answer was complete")
        return remaining

    async def whole(self, servers_dir: Path) -> dict[str, Any]:
        try:
            async with asyncio.timeout(self.remaining()):
                if self.tokens_streamed:
                    completion = await self._joined()
                else:
                    completion = await self._invocation(servers_dir)
        except TimeoutError as exc:
            # Leaving the block closed the model's token stream (a response not read to its end
            # closes its connection): the stream's next write fails and the generation is
            # cancelled. (`/invocations` cannot be cancelled: MLflow's server finishes that
            # request in its thread.)
            raise deadline_exceeded("before the answer was complete") from exc
        usage = completion.get("usage") or {}
        self.metrics.generated_tokens.labels(**self.labels).inc(
            int(usage.get("completion_tokens") or 0)
        )
        return {**completion, "object": "chat.completion", "model": self.chat.model}

    async def _invocation(self, servers_dir: Path) -> dict[str, Any]:
        backend, response = await _invoke(
            self.client, servers_dir, self.backend, self.chat.upstream_body()
        )
        if response.status_code != 200:
            raise _upstream_error(response, backend)
        try:
            body = response.json()
        except ValueError as exc:
            raise FrontDoorError(
                502, f"{backend.name} answered non-JSON", "server_error", "upstream_error"
            ) from exc
        return completion_from(body, backend)

    async def _joined(self) -> dict[str, Any]:
        """A whole completion from the token stream (cancellable, unlike `/invocations`)."""
        head: dict[str, Any] = {}
        content: list[str] = []
        finish_reason = None
        usage = None
        chunks = self._observed(_token_chunks(self.client, self.backend, self._body()))
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
                head = head or _chunk_head(chunk)
                for choice in chunk.get("choices") or []:
                    content.append(choice.get("delta", {}).get("content") or "")
                    finish_reason = choice.get("finish_reason") or finish_reason
                usage = chunk.get("usage") or usage
        message = {"role": "assistant", "content": "".join(content)}
        choice = {"index": 0, "message": message, "finish_reason": finish_reason}
        return {**head, "choices": [choice], "usage": usage}

    def _body(self) -> dict[str, Any]:
        return self.chat.upstream_body()

    async def _observed(
        self, chunks: AsyncGenerator[dict[str, Any], None]
    ) -> AsyncGenerator[dict[str, Any], None]:
        """The chunks, timing the first content and the gaps between contents; closing it
        closes `chunks` (the model's stream) at once, not when the garbage collector gets to it."""
        last = None
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
                has_content = any(
                    (c.get("delta") or {}).get("content") for c in chunk.get("choices") or []
                )
                if has_content:
                    now = time.monotonic()
                    if last is None:
                        self.metrics.ttft.labels(**self.labels).observe(now - self.started)
                    else:
                        self.metrics.inter_token.labels(**self.labels).observe(now - last)
                    last = now
                yield chunk

    async def stream(self, request: Request, servers_dir: Path, release: Any) -> StreamingResponse:
        """Server-sent events; errors before the first chunk are ordinary error answers."""
        if self.tokens_streamed:
            chunks = self._observed(_token_chunks(self.client, self.backend, self._body()))
            kind = "tokens"
        else:
            chunks = self._whole_as_chunks(servers_dir)
            kind = "whole-answer"
        try:
            async with asyncio.timeout(self.remaining()):
                first = await anext(chunks)
        except BaseException as error:
            await chunks.aclose()
            await release()
            if isinstance(error, TimeoutError):
                raise deadline_exceeded("before the first token") from error
            raise
        include_usage = bool(self.chat.stream_options and self.chat.stream_options.include_usage)

        async def events() -> AsyncGenerator[str, None]:
            chunk: dict[str, Any] | None = first
            try:
                while chunk is not None:
                    if chunk.get("usage"):
                        self.metrics.generated_tokens.labels(**self.labels).inc(
                            int(chunk["usage"].get("completion_tokens") or 0)
                        )
                    if chunk.get("choices") or include_usage:
                        yield _sse({**chunk, "model": self.chat.model})
                    try:
                        async with asyncio.timeout(self.remaining()):
                            chunk = await anext(chunks)
                    except StopAsyncIteration:
                        chunk = None
                yield "data: [DONE]\n\n"
            except (TimeoutError, FrontDoorError) as error:
                failure = (
                    error if isinstance(error, FrontDoorError) else deadline_exceeded("mid-stream")
                )
                self.metrics.errors.labels(**self.labels, code=str(failure.status)).inc()
                yield _sse(failure.body())
            finally:
                # A client gone, a deadline or the end: closing the model's stream cancels
                # whatever it was still generating, and the slot is free again. Shielded: a
                # cancelled response task must still get this done.
                with anyio.CancelScope(shield=True):
                    await chunks.aclose()
                    await release()

        return _ClosingStreamingResponse(
            events(),
            media_type="text/event-stream",
            headers={"X-Slmops-Streaming": kind, "Cache-Control": "no-cache"},
        )

    async def _whole_as_chunks(self, servers_dir: Path) -> AsyncGenerator[dict[str, Any], None]:
        """The transformers wrapper's whole answer as chunks: not a token stream."""
        completion = await self._invocation(servers_dir)
        head = {
            "id": completion.get("id") or f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion.chunk",
            "created": completion.get("created") or int(time.time()),
        }
        choice = completion["choices"][0]
        message = choice.get("message") or {}
        delta = {"role": "assistant", "content": message.get("content") or ""}
        yield {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
        finish = {"index": 0, "delta": {}, "finish_reason": choice.get("finish_reason")}
        yield {**head, "choices": [finish]}
        yield {**head, "choices": [], "usage": completion.get("usage")}


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers-dir", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    settings = FrontDoorSettings.from_env(os.environ)
    uvicorn.run(
        create_app(args.servers_dir, settings=settings),
        host=args.host,
        port=args.port,
        log_level="info",
    )


if __name__ == "__main__":
    main()
