"""MLflow model (models-from-code): OpenAI-style chat completions on onnxruntime-genai.

Same request and response shape, and the same signature, as a transformers pipeline logged with
`task="llm/v1/chat"`: `{messages, temperature, max_tokens, stop, n, stream, ...}` in, a list of
chat-completion dicts (one per request row) out, with real token counts and a `finish_reason`
of "stop" (end token or stop sequence) or "length" (token budget or context exhausted).

Logged by path with the onnxruntime-genai model folder as the artifact `onnx_model` and
defaults in `model_config` (`max_new_tokens`, `temperature`, `model_name`). Self-contained, like
`onnx_prompt_model.py`: MLflow copies only this file into the model.
"""

from __future__ import annotations

import json
import math
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModel, PythonModelContext

ARTIFACT_KEY = "onnx_model"
ONNX_URI_KEY = "onnx_model_uri"
DEFAULT_MAX_NEW_TOKENS = 300
DEFAULT_TEMPERATURE = 0.0
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


class OnnxChatModel(PythonModel):
    """Phi-3 on onnxruntime-genai behind the llm/v1/chat request/response contract."""

    def load_context(self, context: PythonModelContext) -> None:
        import onnxruntime_genai as og

        config = dict(context.model_config or {})
        folder = onnx_folder(context.artifacts, config)
        self._max_new_tokens = int(config.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))
        self._temperature = float(config.get("temperature", DEFAULT_TEMPERATURE))
        self._model_name = str(config.get("model_name") or folder.name)
        genai_config = json.loads((folder / "genai_config.json").read_text())
        self._context_length = int(genai_config["model"]["context_length"])
        self._model = og.Model(str(folder))
        self._tokenizer = og.Tokenizer(self._model)
        self._eos_ids = {int(t) for t in self._tokenizer.eos_token_ids}
        # Shared read-only model, a fresh generator per completion; tokenizer calls serialized
        # (not documented as thread-safe, and cheap).
        self._tokenizer_lock = threading.Lock()

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
        search: dict[str, Any] = {"do_sample": temperature > 0}
        if temperature > 0:
            search["temperature"] = temperature
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
        with self._tokenizer_lock:
            prompt = self._tokenizer.apply_chat_template(
                json.dumps(messages), add_generation_prompt=True
            )
            input_ids = self._tokenizer.encode(prompt)
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

    def _generate(self, input_ids: Any, options: dict[str, Any]) -> tuple[str, str, int]:
        """One completion: (text, finish_reason, tokens generated incl. the end token)."""
        import onnxruntime_genai as og

        params = og.GeneratorParams(self._model)
        params.set_search_options(
            max_length=min(len(input_ids) + options["max_tokens"], self._context_length),
            **options["search"],
        )
        generator = og.Generator(self._model, params)
        generator.append_tokens(input_ids)
        new_tokens: list[int] = []
        stops: list[str] = options["stop"]
        stopped_at: int | None = None
        while not generator.is_done():
            generator.generate_next_token()
            new_tokens.append(int(generator.get_next_tokens()[0]))
            if stops:
                text = self._decode(new_tokens)
                hits = [i for i in (text.find(s) for s in stops) if i >= 0]
                if hits:
                    stopped_at = min(hits)
                    break
        del generator
        text = self._decode(new_tokens)
        if stopped_at is not None:
            return text[:stopped_at], "stop", len(new_tokens)
        ended = bool(new_tokens) and new_tokens[-1] in self._eos_ids
        return text, "stop" if ended else "length", len(new_tokens)

    def _decode(self, tokens: list[int]) -> str:
        with self._tokenizer_lock:
            text = self._tokenizer.decode([t for t in tokens if t not in self._eos_ids])
        # The first new token's word-start marker decodes as a space (MLflow's transformers
        # chat output lstrips it too).
        return text.lstrip()


mlflow.models.set_model(OnnxChatModel())
