"""MLflow model (models-from-code): OpenAI-style chat completions on onnxruntime-genai.

Same request and response shape, and the same signature, as a transformers pipeline logged with
`task="llm/v1/chat"`: `{messages, temperature, max_tokens, stop, n, stream, ...}` in, a list of
chat-completion dicts (one per request row) out, with real token counts and a `finish_reason`
of "stop" (end token or stop sequence) or "length" (token budget or context exhausted).

Logged by path with the onnxruntime-genai model folder as the artifact `onnx_model` and
defaults in `model_config` (`max_new_tokens`, `temperature`, `model_name`). Loading and
generation come from `onnx_genai_runtime`, logged with the model (`code_paths`), as for
`onnx_prompt_model.py`.
"""

from __future__ import annotations

import math
import time
import uuid
from typing import Any

import mlflow
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
        self._runtime = runtime.OnnxGenerator(folder)
        self._max_new_tokens = int(config.get("max_new_tokens", runtime.DEFAULT_MAX_NEW_TOKENS))
        self._temperature = float(config.get("temperature", runtime.DEFAULT_TEMPERATURE))
        self._model_name = str(config.get("model_name") or folder.name)
        self._context_length = self._runtime.context_length

    def predict(
        self,
        context: PythonModelContext,
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> list[dict[str, Any]]:
        return [self._complete(request) for request in requests_from_input(model_input)]

    def _options(self, request: dict[str, Any]) -> dict[str, Any]:
        if request.get("stream"):
            raise _invalid("streaming is not supported; send stream=false")
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
                f"max_tokens must be in [1, {self._context_length}] (the model's context), "
                f"got {max_tokens}"
            )
        if not 1 <= n <= MAX_CHOICES:
            raise _invalid(f"n must be in [1, {MAX_CHOICES}], got {n}")
        search: dict[str, Any] = {"temperature": temperature}
        if temperature > 0:
            if "top_p" in request:
                search["top_p"] = float(request["top_p"])
            if "top_k" in request:
                search["top_k"] = int(request["top_k"])
        return {
            "search": search,
            "max_tokens": max_tokens,
            "n": n,
            "stop": _stop_sequences(request.get("stop")),
        }

    def _complete(self, request: dict[str, Any]) -> dict[str, Any]:
        options = self._options(request)
        messages = _messages(request)
        input_ids = self._runtime.encode(self._runtime.chat_prompt(messages))
        if len(input_ids) >= self._context_length:
            raise _invalid(
                f"the conversation has {len(input_ids)} tokens; the model's context is "
                f"{self._context_length}"
            )
        choices = []
        completion_tokens = 0
        for index in range(options["n"]):
            text, finish_reason, used = self._generate(input_ids, options)
            completion_tokens += used
            choices.append(
                {
                    "index": index,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": finish_reason,
                }
            )
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self._model_name,
            "choices": choices,
            "usage": {
                "prompt_tokens": len(input_ids),
                "completion_tokens": completion_tokens,
                "total_tokens": len(input_ids) + completion_tokens,
            },
        }

    def _generate(self, input_ids: list[int], options: dict[str, Any]) -> tuple[str, str, int]:
        """One completion: (text, finish_reason, tokens generated incl. the end token)."""
        stops: list[str] = options["stop"]

        def hit_stop(new_tokens: list[int]) -> bool:
            # Decoded as a whole, so a stop sequence split across tokens is still found.
            text = self._runtime.decode(new_tokens)
            return any(s in text for s in stops)

        new_tokens = self._runtime.generate(
            input_ids, options["max_tokens"], **options["search"], stop=hit_stop if stops else None
        )
        text = self._runtime.decode(new_tokens)
        hits = [i for i in (text.find(s) for s in stops) if i >= 0]
        if hits:
            return text[: min(hits)], "stop", len(new_tokens)
        ended = bool(new_tokens) and new_tokens[-1] in self._runtime.eos_ids
        return text, "stop" if ended else "length", len(new_tokens)


mlflow.models.set_model(OnnxChatModel())
