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
cannot do honestly (streaming, tools, sampling knobs it does not forward), forwards `messages`,
`max_tokens`, `temperature`, `stop` and `n` unchanged, and unwraps the completion. Which server
answers for a model is re-read from its state file `<servers_dir>/<name>.json` on every request,
so a blue/green switch by the release flow is picked up at once and the front door's own
address never changes.

Run it with `python -m slmops.front_door --servers-dir D --host 127.0.0.1 --port P`.
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
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
        return body


class FrontDoorError(Exception):
    """An OpenAI-style error answer."""

    def __init__(self, status: int, message: str, error_type: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type
        self.code = code

    def response(self) -> JSONResponse:
        error = {"message": self.message, "type": self.error_type, "code": self.code}
        return JSONResponse({"error": error}, status_code=self.status)


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
            "messages, max_tokens (or max_completion_tokens), temperature, stop, n",
            "unsupported_parameter",
        )
    known = {k: v for k, v in payload.items() if k in ChatCompletionRequest.model_fields}
    try:
        request = ChatCompletionRequest.model_validate(known)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise invalid_request(f"{where}: {first['msg']}") from exc
    if request.stream:
        raise invalid_request(
            "streaming is not supported: the served models answer whole completions; "
            "send stream=false",
            "stream_not_supported",
        )
    return request


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


def create_app(servers_dir: Path, transport: httpx.AsyncBaseTransport | None = None) -> FastAPI:
    """The front door over the model servers recorded in `servers_dir`.

    Args:
        servers_dir: where `tasks.serving` keeps one state file per served model.
        transport: httpx transport to the model servers (tests pass a fake one).
    """
    app = FastAPI(title="slmops OpenAI-compatible front door", docs_url=None, redoc_url=None)

    @app.exception_handler(FrontDoorError)
    async def _openai_error(request: Request, exc: FrontDoorError) -> JSONResponse:
        return exc.response()

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "models": sorted(served_chat_models(servers_dir))}

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

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> dict[str, Any]:
        try:
            payload = json.loads(await request.body())
        except ValueError as exc:
            raise invalid_request(f"the body is not JSON: {exc}") from exc
        chat = parse_request(payload)
        backend = resolve_model(servers_dir, chat.model)
        async with httpx.AsyncClient(transport=transport, timeout=UPSTREAM_TIMEOUT_S) as client:
            backend, response = await _invoke(client, servers_dir, backend, chat.upstream_body())
        if response.status_code != 200:
            raise _upstream_error(response, backend)
        try:
            body = response.json()
        except ValueError as exc:
            raise FrontDoorError(
                502, f"{backend.name} answered non-JSON", "server_error", "upstream_error"
            ) from exc
        completion = completion_from(body, backend)
        return {**completion, "object": "chat.completion", "model": chat.model}

    return app


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers-dir", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    uvicorn.run(create_app(args.servers_dir), host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
