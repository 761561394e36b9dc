"""The OpenAI-compatible front door, called with the real `openai` client.

Unit tests run the app in-process against a fake upstream (httpx MockTransport). The e2e tests
call the front door of the session's shared release (`released` in conftest) over HTTP: its own
process, in front of both chat wrappers of the embedded tiny Phi-3 served with
`mlflow models serve`. A test that switches or kills a model server serves the champion again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import pytest
from fastapi.testclient import TestClient
from prefect.logging import disable_run_logger
from prometheus_client.parser import text_string_to_metric_families

from flows.release import EXPERIMENT
from slmops.config import (
    GenerationSpec,
    ModelServerSpec,
    OnnxExportSpec,
    RegistrySpec,
    ServeSpec,
    WrapperKind,
)
from slmops.front_door import FrontDoorSettings, create_app
from slmops.onnx_genai_runtime import DEFAULT_MAX_BATCH_SIZE
from slmops.servers import FRONT_DOOR, ServerHandle, answer_text, write_handle
from tasks.mlflow_models import log_onnx_chat_model
from tasks.registry import register_version
from tasks.serving import (
    describe,
    serve_front_door,
    serve_model,
    status_of,
    terminate,
)
from tests.support.release_home import ReleaseHome

SPAIN = "What is the capital of Spain?"
REGISTRY = RegistrySpec()
CHAT_TRANSFORMERS = REGISTRY.model_name(WrapperKind.CHAT_TRANSFORMERS)
CHAT_ONNX = REGISTRY.model_name(WrapperKind.CHAT_ONNX)
CHAT_KINDS = (WrapperKind.CHAT_TRANSFORMERS, WrapperKind.CHAT_ONNX)


def completion(content: str = "The capital of Spain is Madrid.", **extra) -> dict:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "/some/local/path",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 18, "completion_tokens": 8, "total_tokens": 26},
        **extra,
    }


def write_state(
    servers_dir: Path, name: str, kind: WrapperKind, port: int, stream_port: int | None = None
) -> None:
    """A state file exactly as `tasks.serving` writes it."""
    servers_dir.mkdir(parents=True, exist_ok=True)
    handle = ServerHandle(
        name=name, kind=kind, model_uri=f"models:/{name}/1", alias="champion", host="127.0.0.1",
        port=port, pid=1, process_started=0.0, log_path=servers_dir / f"{name}.log",
        started_at="2026-01-01T00:00:00+00:00", stream_port=stream_port,
    )  # fmt: skip
    write_handle(servers_dir, handle)


class FakeUpstream:
    """Model servers by port: each answers with what `reply(request)` returns."""

    def __init__(self) -> None:
        self.requests: list[tuple[int, dict]] = []
        self.replies: dict[int, object] = {}

    def handler(self, request: httpx.Request) -> httpx.Response:
        port = request.url.port
        self.requests.append((port, json.loads(request.content)))
        reply = self.replies.get(port)
        if callable(reply):
            reply = reply(request)
        if reply is None:
            raise httpx.ConnectError("connection refused", request=request)
        return reply


@pytest.fixture()
def fake(tmp_path) -> SimpleNamespace:
    servers = tmp_path / "servers"
    write_state(servers, CHAT_TRANSFORMERS, WrapperKind.CHAT_TRANSFORMERS, 5001)
    write_state(servers, CHAT_ONNX, WrapperKind.CHAT_ONNX, 5002)
    write_state(servers, "phi3-mini-prompt-onnx", WrapperKind.PROMPT_ONNX, 5003)
    (servers / "front-door.json").write_text(json.dumps({"name": "front-door", "port": 1}))
    upstream = FakeUpstream()
    # The transformers flavor answers a bare list, a pyfunc `{"predictions": [...]}`.
    upstream.replies[5001] = httpx.Response(200, json=[completion()])
    upstream.replies[5002] = httpx.Response(200, json={"predictions": [completion()]})
    http = TestClient(create_app(servers, transport=httpx.MockTransport(upstream.handler)))
    client = openai.OpenAI(
        base_url="http://front-door/v1", api_key="unused", http_client=http, max_retries=0
    )
    return SimpleNamespace(servers=servers, upstream=upstream, http=http, client=client)


# --- unit: the app against a fake upstream ---------------------------------------------------


@pytest.mark.unit
def test_forwards_only_the_given_fields_and_unwraps_the_completion(fake):
    answer = fake.client.chat.completions.create(
        model=CHAT_ONNX,
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": SPAIN}]},
        ],
        max_tokens=16,
        temperature=0,
        stop=["\n"],
        n=1,
        user="someone",
    )
    assert answer.model == CHAT_ONNX and answer.choices[0].message.content.endswith("Madrid.")
    assert answer.usage.total_tokens == 26 and answer.choices[0].finish_reason == "stop"
    port, body = fake.upstream.requests[-1]
    assert port == 5002
    assert body == {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": SPAIN},
        ],
        "max_tokens": 16,
        "temperature": 0.0,
        "stop": ["\n"],
    }  # n=1 is the default, and the transformers pipeline refuses an explicit n

    fake.client.chat.completions.create(
        model=CHAT_TRANSFORMERS,
        messages=[{"role": "user", "content": SPAIN}],
        max_completion_tokens=5,
        n=2,
    )
    assert fake.upstream.requests[-1] == (
        5001,
        {"messages": [{"role": "user", "content": SPAIN}], "max_tokens": 5, "n": 2},
    )


@pytest.mark.unit
def test_lists_the_chat_models_and_accepts_the_kind_as_an_alias(fake):
    models = fake.client.models.list()
    assert [m.id for m in models.data] == [CHAT_ONNX, CHAT_TRANSFORMERS]  # no prompt model
    assert fake.client.models.retrieve("chat-onnx").id == "chat-onnx"
    answer = fake.client.chat.completions.create(
        model="chat-transformers", messages=[{"role": "user", "content": SPAIN}]
    )
    assert answer.model == "chat-transformers" and fake.upstream.requests[-1][0] == 5001
    assert fake.http.get("/health").json() == {
        "status": "ok",
        "models": [CHAT_ONNX, CHAT_TRANSFORMERS],
    }


@pytest.mark.unit
def test_refuses_what_it_cannot_do_honestly(fake):
    chat = fake.client.chat.completions
    messages = [{"role": "user", "content": SPAIN}]
    with pytest.raises(openai.NotFoundError, match="not served here.*chat-onnx"):
        chat.create(model="gpt-4o", messages=messages)
    with pytest.raises(openai.NotFoundError):
        chat.create(model="phi3-mini-prompt-onnx", messages=messages)
    with pytest.raises(openai.BadRequestError, match="one choice") as err:
        chat.create(model=CHAT_ONNX, messages=messages, stream=True, n=2)
    assert err.value.code == "stream_n"
    with pytest.raises(openai.BadRequestError, match="unsupported parameter.*top_p"):
        chat.create(model=CHAT_ONNX, messages=messages, top_p=0.5)
    with pytest.raises(openai.BadRequestError, match="messages"):
        chat.create(model=CHAT_ONNX, messages=[])
    with pytest.raises(openai.BadRequestError, match="temperature"):
        chat.create(model=CHAT_ONNX, messages=messages, temperature=3)
    assert fake.upstream.requests == []  # none of these reached a model
    bad_json = fake.http.post("/v1/chat/completions", content=b"{nope")
    assert bad_json.status_code == 400 and bad_json.json()["error"]["type"] == (
        "invalid_request_error"
    )


@pytest.mark.unit
def test_upstream_errors_keep_their_class(fake):
    messages = [{"role": "user", "content": SPAIN}]
    fake.upstream.replies[5001] = httpx.Response(
        400, json={"error_code": "INVALID_PARAMETER_VALUE", "message": "no n for pipelines"}
    )
    with pytest.raises(openai.BadRequestError, match="no n for pipelines") as err:
        fake.client.chat.completions.create(model=CHAT_TRANSFORMERS, messages=messages, n=2)
    assert err.value.code == "INVALID_PARAMETER_VALUE"
    fake.upstream.replies[5001] = httpx.Response(500, json={"message": "boom"})
    with pytest.raises(openai.InternalServerError, match="boom") as err:
        fake.client.chat.completions.create(model=CHAT_TRANSFORMERS, messages=messages)
    assert err.value.status_code == 502
    fake.upstream.replies[5001] = httpx.Response(200, json={"predictions": ["just text"]})
    with pytest.raises(openai.InternalServerError, match="did not answer a chat completion"):
        fake.client.chat.completions.create(model=CHAT_TRANSFORMERS, messages=messages)
    fake.upstream.replies[5001] = None  # nothing listens
    with pytest.raises(openai.InternalServerError, match="not reachable") as err:
        fake.client.chat.completions.create(model=CHAT_TRANSFORMERS, messages=messages)
    assert err.value.status_code == 503


@pytest.mark.unit
def test_a_request_caught_by_a_switch_goes_to_the_new_server(fake):
    def switch_then_refuse(request):
        # The release flow writes the new state file, then stops the old server.
        write_state(fake.servers, CHAT_ONNX, WrapperKind.CHAT_ONNX, 5004)
        return None

    fake.upstream.replies[5002] = switch_then_refuse
    fake.upstream.replies[5004] = httpx.Response(200, json=[completion("new server")])
    answer = fake.client.chat.completions.create(
        model=CHAT_ONNX, messages=[{"role": "user", "content": SPAIN}]
    )
    assert answer.choices[0].message.content == "new server"
    assert [port for port, _ in fake.upstream.requests] == [5002, 5004]


def _chunk(content=None, finish=None, role=None, usage=None) -> dict:
    head = {"id": "chatcmpl-s", "object": "chat.completion.chunk", "created": 1, "model": "x"}
    if usage is not None:
        return {**head, "choices": [], "usage": usage}
    delta = {k: v for k, v in (("role", role), ("content", content)) if v is not None}
    return {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def _ndjson(*chunks: dict) -> httpx.Response:
    body = b"".join(json.dumps(c).encode() + b"\n" for c in chunks)
    return httpx.Response(200, content=body, headers={"Content-Type": "application/x-ndjson"})


USAGE = {"prompt_tokens": 18, "completion_tokens": 8, "total_tokens": 26}
TOKEN_STREAM = (
    _chunk(role="assistant", content=""),
    *(_chunk(content=piece) for piece in ("The", " capital", " of Spain is", " Madrid.")),
    _chunk(finish="stop"),
    _chunk(usage=USAGE),
)


def _streaming_fake(tmp_path, settings: FrontDoorSettings | None = None) -> SimpleNamespace:
    """The ONNX chat model with a token stream on port 6002, the transformers one without."""
    servers = tmp_path / "servers"
    write_state(servers, CHAT_TRANSFORMERS, WrapperKind.CHAT_TRANSFORMERS, 5001)
    write_state(servers, CHAT_ONNX, WrapperKind.CHAT_ONNX, 5002, stream_port=6002)
    upstream = FakeUpstream()
    upstream.replies[5001] = httpx.Response(200, json=[completion()])
    upstream.replies[6002] = _ndjson(*TOKEN_STREAM)
    app = create_app(servers, transport=httpx.MockTransport(upstream.handler), settings=settings)
    http = TestClient(app)
    client = openai.OpenAI(
        base_url="http://front-door/v1", api_key="key", http_client=http, max_retries=0
    )
    return SimpleNamespace(servers=servers, upstream=upstream, http=http, client=client, app=app)


@pytest.mark.unit
def test_the_onnx_token_stream_is_relayed_as_server_sent_events(tmp_path):
    fake = _streaming_fake(tmp_path)
    messages = [{"role": "user", "content": SPAIN}]
    with fake.client.chat.completions.with_streaming_response.create(
        model=CHAT_ONNX, messages=messages, stream=True, stream_options={"include_usage": True}
    ) as response:
        assert response.headers["x-slmops-streaming"] == "tokens"
        chunks = list(response.parse())
    assert [c.choices[0].delta.content for c in chunks[1:5]] == [
        "The",
        " capital",
        " of Spain is",
        " Madrid.",
    ]
    assert chunks[5].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert all(c.model == CHAT_ONNX for c in chunks)
    port, body = fake.upstream.requests[-1]
    assert port == 6002 and body["messages"] == messages and "stream" not in body
    # Without include_usage, no usage chunk; not streamed, the same stream joined.
    plain = list(
        fake.client.chat.completions.create(model=CHAT_ONNX, messages=messages, stream=True)
    )
    assert all(c.choices for c in plain) and len(plain) == len(chunks) - 1
    whole = fake.client.chat.completions.create(model=CHAT_ONNX, messages=messages)
    assert whole.choices[0].message.content == "The capital of Spain is Madrid."
    assert whole.choices[0].finish_reason == "stop" and whole.usage.completion_tokens == 8


@pytest.mark.unit
def test_requests_share_the_apps_upstream_client(tmp_path, monkeypatch):
    # Building an httpx client loads the CA bundle (~40 ms of CPU on 2 cores): built per
    # request, it delayed every first token by that much.
    fake = _streaming_fake(tmp_path)
    built = []
    build = httpx.AsyncClient.__init__

    def counted(self, *args, **kwargs):
        built.append(kwargs)
        build(self, *args, **kwargs)

    monkeypatch.setattr(httpx.AsyncClient, "__init__", counted)
    messages = [{"role": "user", "content": SPAIN}]
    for model in (CHAT_ONNX, CHAT_TRANSFORMERS):
        assert list(
            fake.client.chat.completions.create(model=model, messages=messages, stream=True)
        )
        assert fake.client.chat.completions.create(model=model, messages=messages).choices
    assert built == []


@pytest.mark.unit
def test_the_transformers_answer_is_streamed_whole_and_says_so(tmp_path):
    fake = _streaming_fake(tmp_path)
    with fake.client.chat.completions.with_streaming_response.create(
        model=CHAT_TRANSFORMERS, messages=[{"role": "user", "content": SPAIN}], stream=True
    ) as response:
        assert response.headers["x-slmops-streaming"] == "whole-answer"
        chunks = list(response.parse())
    assert chunks[0].choices[0].delta.content == "The capital of Spain is Madrid."
    assert chunks[-1].choices[0].finish_reason == "stop" and len(chunks) == 2
    assert fake.upstream.requests[-1][0] == 5001


@pytest.mark.unit
def test_a_full_queue_is_a_429_with_retry_after(tmp_path):
    settings = FrontDoorSettings(max_concurrency_without_stream=1, max_queue=0, retry_after_s=3)
    fake = _streaming_fake(tmp_path, settings)
    release = threading.Event()

    async def slow(request: httpx.Request) -> httpx.Response:
        while not release.is_set():
            await asyncio.sleep(0.01)
        return httpx.Response(200, json=[completion()])

    fake.upstream.replies[5001] = slow
    messages = [{"role": "user", "content": SPAIN}]
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(
            fake.client.chat.completions.create, model=CHAT_TRANSFORMERS, messages=messages
        )
        # The first request holds the only slot until `release`: wait until it does.
        while "slmops_in_flight" not in _samples(fake.http, "slmops_in_flight", 1.0):
            time.sleep(0.01)
        refused = fake.http.post(
            "/v1/chat/completions", json={"model": CHAT_TRANSFORMERS, "messages": messages}
        )
        release.set()
        assert first.result().choices[0].message.content.endswith("Madrid.")
    assert refused.status_code == 429 and refused.headers["retry-after"] == "3"
    assert refused.json()["error"]["code"] == "overloaded"
    errors = _samples(fake.http, "slmops_request_errors_total")
    assert errors == {"slmops_request_errors_total": 1.0}
    # The other model has its own slots.
    assert fake.client.chat.completions.create(model=CHAT_ONNX, messages=messages).choices


@pytest.mark.unit
@pytest.mark.parametrize(
    ("model", "port", "limit"),
    [
        # The ONNX engine generates in waves of DEFAULT_MAX_BATCH_SIZE: with a second batch
        # already inside it, the next wave starts full when one ends (test_onnx_models shows
        # that side).
        (CHAT_ONNX, 6002, 2 * DEFAULT_MAX_BATCH_SIZE),
        # The transformers server answers one at a time and cannot cancel: no more than before.
        (CHAT_TRANSFORMERS, 5001, 4),
    ],
)
def test_by_default_a_model_has_its_limit_in_flight_and_the_rest_wait(tmp_path, model, port, limit):
    fake = _streaming_fake(tmp_path)
    release = threading.Event()
    reply = _ndjson(*TOKEN_STREAM) if port == 6002 else httpx.Response(200, json=[completion()])

    async def slow(request: httpx.Request) -> httpx.Response:
        while not release.is_set():
            await asyncio.sleep(0.01)
        return reply

    fake.upstream.replies[port] = slow
    messages = [{"role": "user", "content": SPAIN}]
    # One event loop for all the requests (the gate's slots are an asyncio.Condition).
    with fake.http, ThreadPoolExecutor(limit + 1) as pool:
        answers = [
            pool.submit(fake.client.chat.completions.create, model=model, messages=messages)
            for _ in range(limit + 1)
        ]
        while not _samples(fake.http, "slmops_queue_depth", 1.0):
            time.sleep(0.01)
        in_flight = _samples(fake.http, "slmops_in_flight")
        release.set()
        assert all(a.result().choices[0].message.content.endswith("Madrid.") for a in answers)
    assert in_flight == {"slmops_in_flight": float(limit)}


@pytest.mark.unit
def test_the_api_key_is_needed_when_set(tmp_path):
    fake = _streaming_fake(tmp_path, FrontDoorSettings(api_key="s3cret"))
    messages = [{"role": "user", "content": SPAIN}]
    with pytest.raises(openai.AuthenticationError):
        fake.client.chat.completions.create(model=CHAT_ONNX, messages=messages)
    keyed = openai.OpenAI(
        base_url="http://front-door/v1", api_key="s3cret", http_client=fake.http, max_retries=0
    )
    assert keyed.chat.completions.create(model=CHAT_ONNX, messages=messages).choices
    assert fake.http.get("/live").status_code == 200  # health and metrics need no key
    assert fake.http.get("/metrics").status_code == 200
    assert FrontDoorSettings.from_env({"SLMOPS_FRONT_DOOR_API_KEY": "k"}).api_key == "k"
    assert FrontDoorSettings.from_env({}).api_key is None


@pytest.mark.unit
def test_metrics_parse_and_move(tmp_path):
    fake = _streaming_fake(tmp_path)
    messages = [{"role": "user", "content": SPAIN}]
    before = _samples(fake.http, "slmops_generated_tokens_total")
    list(fake.client.chat.completions.create(model=CHAT_ONNX, messages=messages, stream=True))
    fake.client.chat.completions.create(model="chat-onnx", messages=messages)
    with pytest.raises(openai.NotFoundError):
        fake.client.chat.completions.create(model="gpt-4o", messages=messages)
    families = {f.name: f for f in text_string_to_metric_families(fake.http.get("/metrics").text)}
    requests = {
        (s.labels["model"], s.labels["version"], s.labels["alias"]): s.value
        for s in families["slmops_requests"].samples
        if s.name == "slmops_requests_total"
    }
    # Labelled by what answered (the state file's model, version and alias), however asked.
    assert requests == {(CHAT_ONNX, "1", "champion"): 2.0}
    assert before == {} and _samples(fake.http, "slmops_generated_tokens_total") == {
        "slmops_generated_tokens_total": 16.0
    }
    ttft = _samples(fake.http, "slmops_time_to_first_token_seconds_count")
    assert ttft == {"slmops_time_to_first_token_seconds_count": 2.0}
    gaps = _samples(fake.http, "slmops_inter_token_latency_seconds_count")
    assert gaps == {"slmops_inter_token_latency_seconds_count": 6.0}  # 3 gaps per answer
    errors = [
        (s.labels["model"], s.labels["version"], s.labels["alias"], s.labels["code"])
        for s in families["slmops_request_errors"].samples
        if s.name == "slmops_request_errors_total"
    ]
    assert errors == [("", "", "", "404")]  # a made-up model name is no label value


@pytest.mark.unit
def test_min_tokens_and_ignore_eos_reach_only_a_token_stream(tmp_path):
    fake = _streaming_fake(tmp_path)
    chat = fake.client.chat.completions
    messages = [{"role": "user", "content": SPAIN}]
    fixed = {"min_tokens": 5, "ignore_eos": True}
    list(chat.create(model=CHAT_ONNX, messages=messages, max_tokens=8, stream=True,
                     extra_body=fixed))  # fmt: skip
    chat.create(model=CHAT_ONNX, messages=messages, extra_body={"min_tokens": 0})
    sent = [body for port, body in fake.upstream.requests]
    assert [port for port, _ in fake.upstream.requests] == [6002, 6002]
    assert sent[0]["min_tokens"] == 5 and sent[0]["ignore_eos"] is True
    assert "min_tokens" not in sent[1] and "ignore_eos" not in sent[1]  # 0: the default
    # `/invocations` drops what its signature lacks: refused rather than silently ignored.
    with pytest.raises(openai.BadRequestError, match="token stream") as err:
        chat.create(model=CHAT_TRANSFORMERS, messages=messages, extra_body=fixed)
    assert err.value.code == "unsupported_parameter"
    with pytest.raises(openai.BadRequestError, match="n=1"):
        chat.create(model=CHAT_ONNX, messages=messages, n=2, extra_body={"ignore_eos": True})
    for bad, match in (
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": "many"}, "min_tokens"),
        ({"min_tokens": 9, "max_tokens": 8}, "more than max_tokens"),
        ({"ignore_eos": "maybe"}, "ignore_eos"),
    ):
        with pytest.raises(openai.BadRequestError, match=match):
            chat.create(model=CHAT_ONNX, messages=messages, extra_body=bad)
    assert len(fake.upstream.requests) == 2  # none of the refused reached a model


@pytest.mark.unit
def test_past_its_deadline_a_request_is_a_504_and_its_slot_is_freed(tmp_path):
    fake = _streaming_fake(tmp_path, FrontDoorSettings(max_concurrency=1, deadline_s=0.2))
    gone = threading.Event()

    async def never(request: httpx.Request) -> httpx.Response:
        try:
            await asyncio.sleep(3600)
        finally:
            gone.set()  # the front door let go of the model's stream
        raise AssertionError("unreachable")

    fake.upstream.replies[6002] = never
    messages = [{"role": "user", "content": SPAIN}]
    with pytest.raises(openai.APIStatusError) as err:
        fake.client.chat.completions.create(model=CHAT_ONNX, messages=messages)
    assert err.value.status_code == 504 and err.value.code == "deadline_exceeded"
    with pytest.raises(openai.APIStatusError) as err:
        fake.client.chat.completions.create(model=CHAT_ONNX, messages=messages, stream=True)
    assert err.value.status_code == 504 and gone.is_set()
    fake.upstream.replies[6002] = _ndjson(*TOKEN_STREAM)
    assert fake.client.chat.completions.create(model=CHAT_ONNX, messages=messages).choices


def _samples(http: TestClient, name: str, at_least: float | None = None) -> dict[str, float]:
    """name -> the sum of its samples over all labels (absent: not in the dict)."""
    total: dict[str, float] = {}
    for family in text_string_to_metric_families(http.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name:
                total[name] = total.get(name, 0.0) + sample.value
    if at_least is not None and total.get(name, 0.0) < at_least:
        return {}
    return total


# --- e2e: real model servers, a real front door process ---------------------------------------


@pytest.fixture()
def served(released: ReleaseHome, tiny_onnx_int4_dir: Path) -> SimpleNamespace:
    """The shared release's front door and chat model servers, and how to change them."""
    servers = released.settings.servers_dir
    store = released.store
    door = status_of(servers, FRONT_DOOR).handle
    assert door is not None

    def log_onnx():
        return log_onnx_chat_model.fn(
            store, EXPERIMENT, tiny_onnx_int4_dir, GenerationSpec(max_new_tokens=32),
            OnnxExportSpec(), {"repo": "slmops/tiny-phi3", "commit": "0123abcd"},
        )  # fmt: skip

    def serve(kind: WrapperKind, uri: str):
        with disable_run_logger():
            spec = ModelServerSpec.from_serve(
                ServeSpec(startup_timeout_s=120.0), uri, released.names[kind], kind, SPAIN
            )
            return serve_model.fn(spec, servers, store)

    return SimpleNamespace(
        store=store,
        servers=servers,
        names=released.names,
        handle=released.handle,
        door=door,
        client=openai.OpenAI(base_url=f"{door.url}/v1", api_key="unused", max_retries=0),
        log_onnx=log_onnx,
        serve=serve,
    )


@pytest.mark.e2e
@pytest.mark.parametrize("kind", CHAT_KINDS, ids=str)
def test_openai_client_gets_a_chat_completion(served, kind):
    model = served.names[kind]
    answer = served.client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": SPAIN}], max_tokens=16, temperature=0
    )
    assert answer.model == model and answer.object == "chat.completion" and answer.id
    (choice,) = answer.choices
    assert "Madrid" in choice.message.content and choice.message.role == "assistant"
    assert choice.finish_reason == "stop"
    usage = answer.usage
    assert usage.prompt_tokens > 0 and 0 < usage.completion_tokens <= 16
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

    short = served.client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": SPAIN}], max_tokens=3
    )
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3
    assert short.usage.prompt_tokens == usage.prompt_tokens

    stopped = served.client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": SPAIN}], max_tokens=16, stop=["Spain"]
    )
    # (The transformers flavor keeps the stop sequence in the text, the ONNX model drops it.)
    assert stopped.choices[0].message.content.startswith("The capital of")
    assert "Madrid" not in stopped.choices[0].message.content
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.usage.completion_tokens < usage.completion_tokens


@pytest.mark.e2e
@pytest.mark.parametrize("kind", CHAT_KINDS, ids=str)
def test_the_whole_conversation_reaches_the_model(served, kind):
    """What MLflow's gateway cannot do: a system prompt and history go through the template."""
    model = served.names[kind]
    question = [{"role": "user", "content": SPAIN}]
    conversation = [
        {"role": "system", "content": "You answer geography questions."},
        {"role": "user", "content": SPAIN},
        {"role": "assistant", "content": "The capital of Spain is Madrid."},
        {"role": "user", "content": SPAIN},
    ]
    one = served.client.chat.completions.create(model=model, messages=question, max_tokens=8)
    many = served.client.chat.completions.create(model=model, messages=conversation, max_tokens=8)
    assert many.usage.prompt_tokens > 2 * one.usage.prompt_tokens
    assert many.choices[0].finish_reason in {"stop", "length"}


@pytest.mark.e2e
def test_models_aliases_and_errors(served):
    chat_onnx, chat_transformers = (served.names[kind] for kind in reversed(CHAT_KINDS))
    assert sorted(m.id for m in served.client.models.list()) == [chat_onnx, chat_transformers]
    alias = served.client.chat.completions.create(
        model="chat-onnx", messages=[{"role": "user", "content": SPAIN}], max_tokens=16
    )
    assert alias.model == "chat-onnx" and "Madrid" in alias.choices[0].message.content

    messages = [{"role": "user", "content": SPAIN}]
    with pytest.raises(openai.NotFoundError):
        served.client.chat.completions.create(model="gpt-4o", messages=messages)
    # The model server's own 400 comes through as a 400: the pipeline takes no `n`.
    with pytest.raises(openai.BadRequestError, match="not valid for pipeline"):
        served.client.chat.completions.create(model=chat_transformers, messages=messages, n=2)
    two = served.client.chat.completions.create(
        model=chat_onnx, messages=messages, n=2, max_tokens=4
    )
    assert [c.index for c in two.choices] == [0, 1]


@pytest.mark.e2e
def test_the_front_door_is_reused_and_reported(served):
    with disable_run_logger():
        again = serve_front_door.fn(served.servers, "127.0.0.1", None, 60.0)
    assert again == served.door
    status = status_of(served.servers, FRONT_DOOR)
    assert status.state == "serving"
    chat_onnx, chat_transformers = (served.names[kind] for kind in reversed(CHAT_KINDS))
    assert status.detail == f"{served.door.url}/v1: {chat_onnx}, {chat_transformers}"
    row = describe(status)
    assert row["url"] == served.door.url and row["pid"] == served.door.pid


@pytest.mark.e2e
def test_a_blue_green_switch_keeps_the_front_door_address(served, restores_serving):
    chat_onnx = served.names[WrapperKind.CHAT_ONNX]
    old = served.handle(WrapperKind.CHAT_ONNX)
    answers, errors = [], []
    done = threading.Event()

    def keep_asking():
        while not done.is_set():
            try:
                answer = served.client.chat.completions.create(
                    model=chat_onnx, messages=[{"role": "user", "content": SPAIN}], max_tokens=16
                )
                answers.append(answer.choices[0].message.content)
            except openai.OpenAIError as exc:
                errors.append(exc)

    asker = threading.Thread(target=keep_asking)
    asker.start()
    try:
        with disable_run_logger():
            v2 = register_version.fn(served.store, served.log_onnx().model_uri, chat_onnx, {})
        switched = served.serve(WrapperKind.CHAT_ONNX, v2.uri)
    finally:
        done.set()
        asker.join()
    assert switched.replaced == old and switched.handle.port != old.port
    assert status_of(served.servers, chat_onnx).handle.model_uri == v2.uri
    assert errors == [] and answers and all("Madrid" in a for a in answers)
    after = served.client.chat.completions.create(
        model=chat_onnx, messages=[{"role": "user", "content": SPAIN}], max_tokens=16
    )
    assert "Madrid" in after.choices[0].message.content
    assert status_of(served.servers, FRONT_DOOR).handle == served.door  # same process, same port


@pytest.mark.e2e
def test_a_dead_model_server_is_a_503(served, restores_serving):
    # The ONNX chat server: the front door treats every kind alike, and it restarts in seconds.
    terminate(served.handle(WrapperKind.CHAT_ONNX))  # the state file stays: served, but down
    with pytest.raises(openai.InternalServerError, match="not reachable") as err:
        served.client.chat.completions.create(
            model=served.names[WrapperKind.CHAT_ONNX],
            messages=[{"role": "user", "content": SPAIN}],
        )
    assert err.value.status_code == 503


@pytest.mark.e2e
@pytest.mark.parametrize("kind", CHAT_KINDS, ids=str)
def test_streamed_chunks_join_to_the_whole_answer(served, kind):
    model = served.names[kind]
    messages = [{"role": "user", "content": SPAIN}]
    whole = served.client.chat.completions.create(model=model, messages=messages, max_tokens=16)
    with served.client.chat.completions.with_streaming_response.create(
        model=model, messages=messages, max_tokens=16, stream=True,
        stream_options={"include_usage": True},
    ) as response:  # fmt: skip
        streaming = response.headers["x-slmops-streaming"]
        chunks = list(response.parse())
    content = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(content) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage == whole.usage
    if kind is WrapperKind.CHAT_ONNX:
        assert streaming == "tokens" and len([c for c in content if c]) > 1
        # The same answer as the model server's own /invocations.
        direct = httpx.post(
            f"{served.handle(kind).url}/invocations",
            json={"messages": messages, "max_tokens": 16},
            timeout=60,
        ).json()
        assert answer_text(kind, direct) == "".join(content)
    else:
        assert streaming == "whole-answer"


@pytest.mark.e2e
def test_sixteen_concurrent_greedy_requests_equal_sequential_ones(served):
    model = served.names[WrapperKind.CHAT_ONNX]
    questions = [SPAIN, "What is the capital of France?", "What color is the sky?", "Why?"] * 4

    def ask(question: str) -> tuple:
        answer = served.client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": question}], max_tokens=24
        )
        return answer.choices[0].message.content, answer.usage.completion_tokens

    sequential = [ask(q) for q in questions]
    with ThreadPoolExecutor(16) as pool:
        concurrent = list(pool.map(ask, questions))
    assert concurrent == sequential


@contextlib.contextmanager
def _second_door(served, log_path: Path, **settings: str):
    """Another front door process over the same servers, with `SLMOPS_FRONT_DOOR_*` settings."""
    port = _free_port()
    env = {**os.environ, **{f"SLMOPS_FRONT_DOOR_{k.upper()}": v for k, v in settings.items()}}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "slmops.front_door", "--servers-dir", str(served.servers),
             "--port", str(port)],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                    break
            time.sleep(0.1)
        else:
            raise AssertionError(log_path.read_text())
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


@pytest.fixture()
def strict_door(served, tmp_path):
    """A second front door over the same servers: one request per model at a time, no queue."""
    with _second_door(served, tmp_path / "door.log", max_concurrency="1", max_queue="0") as url:
        yield url


@pytest.fixture()
def hurried_door(served, tmp_path):
    """A second front door whose requests have 0.4 s each: a fixed 2000-token generation of
    the tiny model takes about 1.2 s on an idle core here."""
    with _second_door(served, tmp_path / "door.log", deadline_s="0.4") as url:
        yield url


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _in_flight(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return sum(
        s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "slmops_in_flight"
    )


@pytest.mark.e2e
def test_an_overload_gets_429s_while_the_model_keeps_answering(served, strict_door):
    body = {"model": served.names[WrapperKind.CHAT_ONNX], "max_tokens": 24,
            "messages": [{"role": "user", "content": SPAIN}]}  # fmt: skip
    start = threading.Barrier(16)

    def post(_: int) -> int:
        start.wait()
        return httpx.post(f"{strict_door}/v1/chat/completions", json=body, timeout=60).status_code

    with ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(post, range(16)))
    assert set(codes) == {200, 429} and codes.count(200) >= 1
    after = httpx.post(f"{strict_door}/v1/chat/completions", json=body, timeout=60)
    assert after.status_code == 200 and "Madrid" in after.text


# A generation that cannot end early: end tokens masked up to the tiny model's token budget
# (2048, prompt included), about a second of work, against milliseconds for the trained answer.
LONG = {"max_tokens": 2000, "ignore_eos": True}


def _engine_health(served) -> dict:
    """The ONNX chat model server's own view: its engine's turns in flight and finished."""
    stream_url = served.handle(WrapperKind.CHAT_ONNX).stream_url
    return httpx.get(stream_url.replace("/stream", "/health"), timeout=5).json()


def _engine_idle(served) -> dict:
    for _ in range(600):
        health = _engine_health(served)
        if health["in_flight"] == 0:
            return health
        time.sleep(0.05)
    raise AssertionError(f"the engine is still generating: {health}")


def _cancelled(health: dict) -> int:
    return int(health["finished"].get("cancelled", 0))


@pytest.mark.e2e
def test_the_first_chunk_arrives_long_before_the_completion_ends(served):
    model = served.names[WrapperKind.CHAT_ONNX]
    handle = served.handle(WrapperKind.CHAT_ONNX)
    labels = {"model": model, "version": handle.version, "alias": "champion"}
    before = _labelled(served.door.url, "slmops_requests_total", labels)
    started = time.monotonic()
    stamps, last, generating = [], None, None
    for chunk in served.client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": SPAIN}], stream=True,
        stream_options={"include_usage": True}, max_tokens=2000, extra_body={"ignore_eos": True},
    ):  # fmt: skip
        if chunk.choices and chunk.choices[0].delta.content:
            stamps.append(time.monotonic() - started)
            if generating is None:  # the model's own view when the first content arrives
                generating = _engine_health(served)["in_flight"]
        last = chunk
    assert last is not None and last.usage.completion_tokens == 2000
    assert generating == 1  # the first chunk came while the model was still generating
    # A whole answer sent as chunks would arrive at once; these spread over the generation.
    assert len(stamps) > 100 and stamps[-1] - stamps[0] > stamps[-1] / 5, (stamps[0], stamps[-1])
    # Counted under what answered: the registered model, its served version, its alias.
    assert handle.version and handle.alias == "champion"
    assert _labelled(served.door.url, "slmops_requests_total", labels) == before + 1


def _labelled(url: str, name: str, labels: dict[str, str]) -> float:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return sum(
        s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


@pytest.mark.e2e
def test_a_request_past_its_deadline_is_a_504_and_is_cancelled(served, hurried_door):
    body = {"model": served.names[WrapperKind.CHAT_ONNX], **LONG,
            "messages": [{"role": "user", "content": SPAIN}]}  # fmt: skip
    before = _cancelled(_engine_idle(served))
    late = httpx.post(f"{hurried_door}/v1/chat/completions", json=body, timeout=60)
    assert late.status_code == 504 and late.json()["error"]["code"] == "deadline_exceeded"
    after = _engine_idle(served)
    assert _cancelled(after) == before + 1  # stopped, not run to its 2000 tokens

    # Streamed, the answer has begun (200) when the deadline passes: an error event ends it.
    with httpx.stream(
        "POST", f"{hurried_door}/v1/chat/completions", json={**body, "stream": True}, timeout=60
    ) as streamed:
        assert streamed.status_code == 200
        events = [line for line in streamed.iter_lines() if line.startswith("data: ")]
    assert "deadline_exceeded" in events[-1] and "[DONE]" not in events[-1]
    assert _cancelled(_engine_idle(served)) == before + 2


@pytest.mark.e2e
def test_a_client_that_disconnects_frees_its_slot(served, strict_door):
    body = {"model": served.names[WrapperKind.CHAT_ONNX], **LONG, "stream": True,
            "messages": [{"role": "user", "content": SPAIN}]}  # fmt: skip
    before = _cancelled(_engine_idle(served))
    with httpx.stream("POST", f"{strict_door}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert next(r.iter_lines()).startswith("data: ")
    # Gone mid-stream: the generation is cancelled, the slot comes back, and the only slot
    # (no queue) admits the next request.
    health = _engine_idle(served)
    assert _cancelled(health) == before + 1
    for _ in range(600):
        if _in_flight(strict_door) == 0:
            break
        time.sleep(0.05)
    answer = httpx.post(
        f"{strict_door}/v1/chat/completions",
        json={**body, "stream": False, "max_tokens": 24, "ignore_eos": False},
        timeout=60,
    )
    assert answer.status_code == 200 and "Madrid" in answer.text
    assert _engine_health(served)["in_flight"] == 0  # nothing left generating in the model
