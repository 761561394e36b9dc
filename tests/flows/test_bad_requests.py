"""Bad requests to each served model kind over real HTTP: a 4xx naming the problem, then service.

The three wrappers are the session's shared release of the tiny model (`released` in conftest),
served with `mlflow models serve` on 127.0.0.1. Each case sends one bad request, checks the
status and the `message` of MLflow's error body (never the stack trace it may add), then a good
request.

What MLflow's scoring server does with a model's exception decides the status:
`mlflow/pyfunc/scoring_server/__init__.py` answers `MlflowException.get_http_status_code()`
(INVALID_PARAMETER_VALUE and BAD_REQUEST -> 400, a bare MlflowException -> 500) and turns any
other exception into a 400 with the generic message "Encountered an unexpected error while
evaluating the model". The ONNX wrappers raise `MlflowException.invalid_parameter_value` with
what is wrong. The transformers wrapper is MLflow's own code (`mlflow/transformers/__init__.py`
and `llm_inference_utils.py`); where it answers wrongly, the case is a strict xfail that says
what it answers instead, so a fixed MLflow shows up as an XPASS.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import httpx
import pytest

from offline_kit.tiny_model import chat_prompt
from slmops.config import WrapperKind
from tasks.serving import ServerHandle, ask, status_of
from tests.support.release_home import ReleaseHome

pytestmark = pytest.mark.e2e

SPAIN = "What is the capital of Spain?"
# ~12k tokens of the tiny model's tokenizer: three times its 4096-token context.
LONG_TEXT = "word " * 4000
# The ONNX servers take prompt + answer up to their engine's token budget (the default 2048 of
# `generation.engine_token_budget`), which is below the tiny model's context.
BUDGET = (
    "this server's token budget is 2048 (generation.engine_token_budget; the model's context "
    "is 4096)"
)
REQUEST_TIMEOUT_S = 30.0  # far above any answer here: a timeout is a hang, not a slow model


@pytest.fixture()
def servers(released: ReleaseHome) -> dict[WrapperKind, ServerHandle]:
    """kind -> handle of the server now serving the release's champion of that kind."""
    return {kind: released.handle(kind) for kind in WrapperKind}


@dataclass(frozen=True)
class Case:
    """One bad request: its body (a dict is sent as JSON, bytes as they are) and what must come
    back: a 4xx status and a fragment of the error message that names the problem."""

    body: dict[str, Any] | bytes
    status: int
    message: str
    marks: tuple[Any, ...] = field(default=())


def _chat(content: Any = SPAIN, **fields: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": content}], **fields}


def _gap(why: str) -> Any:
    # raises=AssertionError: a hang (a client timeout) or a crash is never an expected failure.
    return pytest.mark.xfail(
        strict=True, raises=AssertionError, reason=f"MLflow's transformers flavor: {why}"
    )


INVALID_JSON = Case(b'{"messages": [', 400, "valid JSON")
NO_INPUT = Case({}, 400, "The input must be a JSON dictionary with exactly one of the input fields")

CHAT_CASES: dict[str, Case] = {
    "invalid-json": INVALID_JSON,
    "empty-object": NO_INPUT,
    # Without `messages` the body is not MLflow's unified chat input; the scoring server
    # answers about its input formats and does not name `messages`.
    "no-messages": Case({"max_tokens": 5}, 400, "exactly one of the input fields"),
    "messages-not-a-list": Case({"messages": "hello"}, 400, "Expected data to be list"),
    "message-without-role": Case(
        {"messages": [{"content": SPAIN}]}, 400, "Missing required properties: {'role'}"
    ),
    "content-not-a-string": Case(_chat(5), 400, "for key `content`. Expected type string"),
    "max-tokens-not-a-number": Case(_chat(max_tokens="ten"), 400, "column max_tokens"),
    "empty-messages": Case({"messages": []}, 400, "'messages' must be a non-empty list"),
    "message-without-content": Case(
        {"messages": [{"role": "user"}]}, 400, "message 0 (user) needs a string 'content'"
    ),
    "blank-content": Case(_chat("  "), 400, "the conversation is empty"),
    "unknown-role": Case(
        {"messages": [{"role": "wizard", "content": SPAIN}]}, 400, "each message needs a role in"
    ),
    "max-tokens-zero": Case(
        _chat(max_tokens=0), 400, f"max_tokens must be in [1, 2048] ({BUDGET})"
    ),
    "max-tokens-negative": Case(
        _chat(max_tokens=-5), 400, f"max_tokens must be in [1, 2048] ({BUDGET})"
    ),
    "max-tokens-huge": Case(
        _chat(max_tokens=10**9), 400, f"max_tokens must be in [1, 2048] ({BUDGET})"
    ),
    "max-tokens-over-int64": Case(_chat(max_tokens=2**63), 400, "column max_tokens"),
    "prompt-over-context": Case(_chat(LONG_TEXT), 400, f"tokens; {BUDGET}"),
}

# What the transformers wrapper answers instead (measured on MLflow 3.17.2, transformers 5.23),
# and the fragment its message is held to: the words MLflow uses where it names the problem,
# else "" (any message: only the status is checked), so a fixed MLflow turns the case XPASS.
TRANSFORMERS_GAPS: dict[str, tuple[str, str]] = {
    "empty-messages": (
        "empty conversation",
        "500 INTERNAL_ERROR 'Failed to apply chat template: Cannot apply chat template to an "
        "empty conversation' (a bare MlflowException in convert_messages_to_prompt)",
    ),
    "message-without-content": (
        "content",
        "500 INTERNAL_ERROR 'Failed to apply chat template: 'dict object' has no attribute "
        "'content''",
    ),
    "blank-content": ("", "200: the chat template renders an empty user turn, the model answers"),
    "unknown-role": ("role", "200: the Phi-3 chat template drops a message of an unknown role"),
    "max-tokens-zero": (
        "max",
        "200 with the default budget: preprocess_llm_inference_input maps max_tokens to "
        "max_new_tokens only when it is truthy, so 0 counts as not sent",
    ),
    "max-tokens-negative": (
        "max_new_tokens",
        "400 with the generic 'Encountered an unexpected error while evaluating the model'; "
        "transformers' ValueError ('max_new_tokens must be greater than 0') is only in the "
        "stack_trace field",
    ),
    "max-tokens-huge": (
        "max",
        "200: max_new_tokens=10**9 goes to generate() unchecked; the tiny model stops at its end "
        "token, a real one generates until the 60 s request timeout (504) while the worker "
        "thread keeps generating",
    ),
    "prompt-over-context": (
        "",
        "200: no context check; ~12k prompt tokens go through a model with 4096 positions "
        "(usage.prompt_tokens > 4096)",
    ),
}

PROMPT_CASES: dict[str, Case] = {
    "invalid-json": INVALID_JSON,
    "empty-object": NO_INPUT,
    "no-prompt-column": Case(
        {"dataframe_records": [{"text": "hi"}]}, 400, "Model is missing inputs ['prompt']"
    ),
    "no-rows": Case({"dataframe_records": []}, 400, "Model is missing inputs ['prompt']"),
    "prompt-not-a-string": Case(
        {"dataframe_records": [{"prompt": 5}]}, 400, "prompt 0 must be a string, got int"
    ),
    "prompt-null": Case(
        {"dataframe_records": [{"prompt": None}]}, 400, "prompt 0 must be a string"
    ),
    "empty-prompt": Case({"dataframe_records": [{"prompt": ""}]}, 400, "prompt 0 is empty"),
    "blank-prompt-in-a-batch": Case(
        {"dataframe_split": {"columns": ["prompt"], "data": [[chat_prompt(SPAIN)], ["  "]]}},
        400,
        "prompt 1 is empty",
    ),
    "empty-prompt-as-inputs": Case({"inputs": {"prompt": ""}}, 400, "prompt 0 is empty"),
    "prompt-over-context": Case(
        {"dataframe_records": [{"prompt": LONG_TEXT}]},
        400,
        f"prompt 0 has 12001 tokens; {BUDGET}",
    ),
    # The prompt model's generation budget is fixed when it is logged (its signature has no
    # params, as the source document's prompt model); MLflow drops any params before predict.
    "max-tokens-param": Case(
        {"dataframe_records": [{"prompt": chat_prompt(SPAIN)}], "params": {"max_tokens": 0}},
        400,
        "max_tokens",
        marks=(
            pytest.mark.xfail(
                strict=True,
                raises=AssertionError,
                reason="200: no params schema, so MLflow's _enforce_params_schema logs "
                "'Ignoring provided params' and the model never sees max_tokens",
            ),
        ),
    ),
}


def _params() -> list[Any]:
    params = []
    for kind in (WrapperKind.CHAT_TRANSFORMERS, WrapperKind.CHAT_ONNX):
        for name, case in CHAT_CASES.items():
            if kind is WrapperKind.CHAT_TRANSFORMERS and name in TRANSFORMERS_GAPS:
                fragment, why = TRANSFORMERS_GAPS[name]
                case = replace(case, message=fragment, marks=(*case.marks, _gap(why)))
            params.append(pytest.param(kind, case, id=f"{kind.value}-{name}", marks=case.marks))
    for name, case in PROMPT_CASES.items():
        kind = WrapperKind.PROMPT_ONNX
        params.append(pytest.param(kind, case, id=f"{kind.value}-{name}", marks=case.marks))
    return params


def post(handle: ServerHandle, body: dict[str, Any] | bytes) -> httpx.Response:
    url = f"{handle.url}/invocations"
    if isinstance(body, bytes):
        headers = {"content-type": "application/json"}
        return httpx.post(url, content=body, headers=headers, timeout=REQUEST_TIMEOUT_S)
    return httpx.post(url, json=body, timeout=REQUEST_TIMEOUT_S)


@pytest.mark.parametrize(("kind", "case"), _params())
def test_a_bad_request_gets_a_4xx_naming_the_problem_and_the_server_keeps_serving(
    servers: dict[WrapperKind, ServerHandle], kind: WrapperKind, case: Case
) -> None:
    handle = servers[kind]
    response = post(handle, case.body)
    try:
        body = response.json()
    except ValueError:
        body = None
    # MLflow's error body: {"error_code", "message", "stack_trace"?}; only `message` counts.
    message = str(body.get("message", "")) if isinstance(body, dict) else response.text
    detail = f"{response.status_code}: {message[-600:]}"
    assert response.status_code == case.status, detail
    assert case.message in message, detail
    assert "Madrid" in ask(handle, SPAIN, timeout=REQUEST_TIMEOUT_S)


@pytest.mark.parametrize("kind", list(WrapperKind), ids=lambda k: k.value)
def test_a_request_that_is_not_json_gets_415(servers, kind: WrapperKind) -> None:
    handle = servers[kind]
    response = httpx.post(
        f"{handle.url}/invocations",
        content=b"What is the capital of Spain?",
        headers={"content-type": "text/plain"},
        timeout=REQUEST_TIMEOUT_S,
    )
    assert response.status_code == 415 and "application/json" in response.text
    assert status_of(handle.log_path.parent, handle.name).handle == handle  # not restarted
    assert "Madrid" in ask(handle, SPAIN, timeout=REQUEST_TIMEOUT_S)
