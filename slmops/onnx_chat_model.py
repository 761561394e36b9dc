"""MLflow model (models-from-code): OpenAI-style chat completions on onnxruntime-genai.

Same request and response shape, and the same signature, as a transformers pipeline logged with
`task="llm/v1/chat"`: `{messages, temperature, max_tokens, stop, n, stream, ...}` in, a list of
chat-completion dicts (one per request row) out, with real token counts and a `finish_reason`
of "stop" (end token or stop sequence) or "length" (token budget or context exhausted).

Logged by path with the onnxruntime-genai model folder as the artifact `onnx_model` and
defaults in `model_config` (`max_new_tokens`, `temperature`, `model_name`, and the shared
engine's `engine_max_batch_size` and `engine_token_budget`). Loading and generation come from
`onnx_genai_runtime`, logged with the model (`code_paths`), as for `onnx_prompt_model.py`.

Concurrent requests (and the `n` choices of one) are generated together by the model's one
onnxruntime-genai engine. `predict_stream` yields OpenAI `chat.completion.chunk` dicts for one
request: a role chunk, content deltas as tokens come (a stop sequence split across tokens is
held back, never sent), a chunk with the `finish_reason`, then one with `usage` and no choices.
"""

from __future__ import annotations

import math
import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModel, PythonModelContext

try:  # served: the copy MLflow ships in the model's code/ folder (code_paths)
    import onnx_genai_runtime as runtime  # type: ignore[import-not-found]
except ImportError:  # imported from the slmops package (logging, tests)
    from slmops import onnx_genai_runtime as runtime

ARTIFACT_KEY = runtime.ARTIFACT_KEY
ONNX_URI_KEY = runtime.ONNX_URI_KEY
MAX_CHOICES = 8
ROLES = frozenset({"system", "user", "assistant"})


def _invalid(message: str) -> MlflowException:
    return MlflowException.invalid_parameter_value(message)


def _missing(value: Any) -> bool:
    """None, or a NaN that pandas put in an optional column nobody sent."""
    if value is None:
        return True
    try:
        return bool(isinstance(value, float) and math.isnan(value))
    except TypeError:
        return False


def requests_from_input(model_input: Any) -> list[dict[str, Any]]:
    """Chat requests from what pyfunc hands over: a DataFrame (a row per request), a dict, or a
    list of request dicts; a bare list of messages is one request."""
    if isinstance(model_input, pd.DataFrame):
        rows = model_input.to_dict(orient="records")
    elif isinstance(model_input, dict):
        rows = [model_input]
    elif isinstance(model_input, list) and all(isinstance(r, dict) for r in model_input):
        rows = (
            [{"messages": model_input}] if model_input and "role" in model_input[0] else model_input
        )
    else:
        raise _invalid(f"unsupported input type {type(model_input).__name__}")
    requests = [{k: v for k, v in row.items() if not _missing(v)} for row in rows]
    if not requests:
        raise _invalid("no chat request in the input")
    return requests


def _messages(request: dict[str, Any]) -> list[dict[str, str]]:
    messages = request.get("messages")
    if messages is None or not len(messages):
        raise _invalid("'messages' must be a non-empty list of {role, content}")
    cleaned = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise _invalid(f"each message needs a role in {sorted(ROLES)}, got {message!r}")
        content = message.get("content")
        # The signature makes `content` optional (OpenAI's tool-call messages have none); a
        # message without text would silently become an empty turn of the chat template.
        if _missing(content) or not isinstance(content, str):
            raise _invalid(f"message {index} ({message['role']}) needs a string 'content'")
        cleaned.append({"role": message["role"], "content": content})
    if not any(m["content"].strip() for m in cleaned):
        raise _invalid("the conversation is empty: every message's 'content' is blank")
    return cleaned


def _min_tokens(request: dict[str, Any], max_tokens: int) -> int:
    """End tokens are not generated before this many tokens (vLLM's `min_tokens`);
    `ignore_eos` makes it `max_tokens`: a fixed-length generation."""
    ignore_eos = request.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool | np.bool_):
        raise _invalid(f"ignore_eos must be true or false, got {ignore_eos!r}")
    value = request.get("min_tokens", 0)
    if isinstance(value, float | np.floating) and float(value).is_integer():
        value = int(value)  # a frame column with missing rows is float
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | np.integer):
        raise _invalid(f"min_tokens must be a whole number, got {value!r}")
    if not 0 <= value <= max_tokens:
        raise _invalid(f"min_tokens must be in [0, max_tokens={max_tokens}], got {value}")
    return max_tokens if ignore_eos else int(value)


def _stop_sequences(value: Any) -> list[str]:
    if _missing(value):
        return []
    stops = [value] if isinstance(value, str) else [str(s) for s in value]
    return [s for s in stops if s]


class OnnxChatModel(PythonModel):
    """Phi-3 on onnxruntime-genai behind the llm/v1/chat request/response contract."""

    def load_context(self, context: PythonModelContext) -> None:
        config = dict(context.model_config or {})
        folder = runtime.onnx_folder(context.artifacts, config)
        self._runtime = runtime.OnnxGenerator.from_config(folder, config)
        self._max_new_tokens = int(config.get("max_new_tokens", runtime.DEFAULT_MAX_NEW_TOKENS))
        self._temperature = float(config.get("temperature", runtime.DEFAULT_TEMPERATURE))
        self._model_name = str(config.get("model_name") or folder.name)
        self._context_length = self._runtime.context_length
        # Served: the engine's token stream on the port the serve task gave (see
        # `onnx_genai_runtime.serve_token_stream`); loaded anywhere else, nothing is opened.
        stream_port = os.environ.get(runtime.STREAM_PORT_VARIABLE)
        self._stream_server = (
            runtime.serve_token_stream(
                int(stream_port),
                lambda r: self.predict_stream(context, r),
                lambda: self._runtime.engine.health(),
            )
            if stream_port
            else None
        )

    def predict(
        self,
        context: PythonModelContext,
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> list[dict[str, Any]]:
        return [self._complete(request) for request in requests_from_input(model_input)]

    def predict_stream(
        self,
        context: PythonModelContext,
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> Iterator[dict[str, Any]]:
        """One request's completion as OpenAI chunks, content as the engine generates it."""
        requests = requests_from_input(model_input)
        if len(requests) != 1:
            raise _invalid(f"predict_stream takes one chat request, got {len(requests)}")
        request = {k: v for k, v in requests[0].items() if k not in ("stream", "stream_options")}
        options = self._options(request)
        if options["n"] != 1:
            raise _invalid("a streamed completion has one choice; send n=1")
        input_ids = self._input_ids(request)
        (turn,) = self._turns(input_ids, options)
        head = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": self._model_name,
        }

        def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
            return {**head, "choices": [choice]}

        yield chunk({"role": "assistant", "content": ""})
        deltas = turn.deltas()
        try:
            for text in deltas:
                yield chunk({"content": text})
        finally:
            deltas.close()  # a consumer that stops reading cancels the generation
        yield chunk({}, turn.finish_reason)
        yield {**head, "choices": [], "usage": _usage(len(input_ids), turn.completion_tokens)}

    def _options(self, request: dict[str, Any]) -> dict[str, Any]:
        if request.get("stream"):
            raise _invalid("streaming is not supported here; send stream=false")
        if request.get("tools"):
            raise _invalid("tool calling is not supported by this model")
        for penalty in ("frequency_penalty", "presence_penalty"):
            if float(request.get(penalty) or 0.0) != 0.0:
                raise _invalid(f"{penalty} is not supported")
        temperature = float(request.get("temperature", self._temperature))
        max_tokens = int(request.get("max_tokens", self._max_new_tokens))
        n = int(request.get("n", 1))
        if not 0.0 <= temperature <= 2.0:
            raise _invalid(f"temperature must be in [0, 2], got {temperature}")
        if not 1 <= max_tokens <= self._context_length:
            raise _invalid(
                f"max_tokens must be in [1, {self._context_length}] "
                f"({self._runtime.context_limit}), got {max_tokens}"
            )
        if not 1 <= n <= MAX_CHOICES:
            raise _invalid(f"n must be in [1, {MAX_CHOICES}], got {n}")
        min_tokens = _min_tokens(request, max_tokens)
        search: dict[str, Any] = {"temperature": temperature}
        if temperature > 0:
            if "top_p" in request:
                search["top_p"] = float(request["top_p"])
            if "top_k" in request:
                search["top_k"] = int(request["top_k"])
        return {
            "search": search,
            "max_tokens": max_tokens,
            "min_tokens": min_tokens,
            "n": n,
            "stop": _stop_sequences(request.get("stop")),
        }

    def _input_ids(self, request: dict[str, Any]) -> list[int]:
        messages = _messages(request)
        input_ids = self._runtime.encode(self._runtime.chat_prompt(messages))
        if len(input_ids) >= self._context_length:
            raise _invalid(
                f"the conversation has {len(input_ids)} tokens; {self._runtime.context_limit}"
            )
        return input_ids

    def _turns(self, input_ids: list[int], options: dict[str, Any]) -> list[runtime.TextTurn]:
        """The request's `n` choices, handed to the engine together (one batch if room)."""
        spec = runtime.TurnSpec(
            input_ids, options["max_tokens"], min_new_tokens=options["min_tokens"],
            **options["search"],
        )  # fmt: skip
        return runtime.TextTurn.start(self._runtime, [spec] * options["n"], options["stop"])

    def _complete(self, request: dict[str, Any]) -> dict[str, Any]:
        options = self._options(request)
        input_ids = self._input_ids(request)
        turns = self._turns(input_ids, options)
        choices = [
            {
                "index": index,
                "message": {"role": "assistant", "content": turn.run()},
                "finish_reason": turn.finish_reason,
            }
            for index, turn in enumerate(turns)
        ]
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self._model_name,
            "choices": choices,
            "usage": _usage(len(input_ids), sum(turn.completion_tokens for turn in turns)),
        }


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


mlflow.models.set_model(OnnxChatModel())
