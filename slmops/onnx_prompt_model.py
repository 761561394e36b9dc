"""MLflow model (models-from-code): a batch of raw prompts -> generated text, on onnxruntime-genai.

Logged by path with the onnxruntime-genai model folder as the artifact `onnx_model` and the
generation options as `model_config` (`max_new_tokens`, `temperature`; 0 means greedy). The
signature has no params, so options are fixed per logged model.

The file is self-contained (mlflow, numpy, pandas, onnxruntime-genai): MLflow copies only this
file into the model, so a server can load it without slmops installed.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModel, PythonModelContext

ARTIFACT_KEY = "onnx_model"
ONNX_URI_KEY = "onnx_model_uri"
PROMPT_COLUMN = "prompt"
DEFAULT_MAX_NEW_TOKENS = 300
DEFAULT_TEMPERATURE = 0.0


def prompts_from_input(model_input: Any) -> list[str]:
    """The prompts of one request: a DataFrame/dict with a `prompt` column, or a list of them."""
    if isinstance(model_input, pd.DataFrame):
        if PROMPT_COLUMN not in model_input.columns:
            raise MlflowException.invalid_parameter_value(
                f"expected a '{PROMPT_COLUMN}' column, got {list(model_input.columns)}"
            )
        values: Sequence[Any] = model_input[PROMPT_COLUMN].tolist()
    elif isinstance(model_input, dict):
        if PROMPT_COLUMN not in model_input:
            raise MlflowException.invalid_parameter_value(
                f"expected a '{PROMPT_COLUMN}' key, got {sorted(model_input)}"
            )
        value = model_input[PROMPT_COLUMN]
        values = [value] if isinstance(value, str) else list(value)
    elif isinstance(model_input, str):
        values = [model_input]
    elif isinstance(model_input, list):
        values = [row[PROMPT_COLUMN] if isinstance(row, dict) else row for row in model_input]
    else:
        raise MlflowException.invalid_parameter_value(
            f"unsupported input type {type(model_input).__name__}; send {{'prompt': '...'}}"
        )
    if not values:
        raise MlflowException.invalid_parameter_value("no prompt in the input")
    for index, value in enumerate(values):
        if not isinstance(value, str):
            raise MlflowException.invalid_parameter_value(
                f"prompt {index} must be a string, got {type(value).__name__}"
            )
        # onnxruntime-genai cannot start from zero tokens (a RuntimeError, i.e. an opaque 400).
        if not value.strip():
            raise MlflowException.invalid_parameter_value(f"prompt {index} is empty")
    return list(values)


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


class OnnxPromptModel(PythonModel):
    """Phi-3 on onnxruntime-genai: `{prompt: string}` rows -> generated strings."""

    def load_context(self, context: PythonModelContext) -> None:
        import onnxruntime_genai as og

        config = dict(context.model_config or {})
        folder = onnx_folder(context.artifacts, config)
        self._max_new_tokens = int(config.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))
        self._temperature = float(config.get("temperature", DEFAULT_TEMPERATURE))
        genai_config = json.loads((folder / "genai_config.json").read_text())
        self._context_length = int(genai_config["model"]["context_length"])
        self._model = og.Model(str(folder))
        self._tokenizer = og.Tokenizer(self._model)
        self._eos_ids = {int(t) for t in self._tokenizer.eos_token_ids}
        # The model is shared read-only across requests; each request gets its own generator.
        # The tokenizer is not documented as thread-safe, and its calls are cheap, so they are
        # serialized.
        self._tokenizer_lock = threading.Lock()

    def predict(
        self,
        context: PythonModelContext,
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> list[str]:
        # Every prompt is checked before any is generated: a bad row fails the batch at once.
        encoded = [
            self._encode(index, p) for index, p in enumerate(prompts_from_input(model_input))
        ]
        return [self._generate(input_ids) for input_ids in encoded]

    def _encode(self, index: int, prompt: str) -> Any:
        with self._tokenizer_lock:
            input_ids = self._tokenizer.encode(prompt)
        if len(input_ids) >= self._context_length:
            raise MlflowException.invalid_parameter_value(
                f"prompt {index} has {len(input_ids)} tokens; the model's context is "
                f"{self._context_length}"
            )
        return input_ids

    def _generate(self, input_ids: Any) -> str:
        import onnxruntime_genai as og

        options: dict[str, Any] = {
            "max_length": min(len(input_ids) + self._max_new_tokens, self._context_length),
            "do_sample": self._temperature > 0,
        }
        if self._temperature > 0:
            options["temperature"] = self._temperature
        params = og.GeneratorParams(self._model)
        params.set_search_options(**options)
        generator = og.Generator(self._model, params)
        generator.append_tokens(input_ids)
        new_tokens: list[int] = []
        while not generator.is_done():
            generator.generate_next_token()
            new_tokens.append(int(generator.get_next_tokens()[0]))
        del generator
        text_tokens = [t for t in new_tokens if t not in self._eos_ids]
        with self._tokenizer_lock:
            text = self._tokenizer.decode(text_tokens)
        # The first new token's word-start marker decodes as a space (as in transformers' output,
        # which MLflow lstrips too).
        return text.lstrip()


mlflow.models.set_model(OnnxPromptModel())
