"""MLflow model (models-from-code): a batch of raw prompts -> generated text, on onnxruntime-genai.

Logged by path with the onnxruntime-genai model folder as the artifact `onnx_model` and the
generation options as `model_config` (`max_new_tokens`, `temperature`; 0 means greedy;
`engine_max_batch_size`, `engine_token_budget` for the shared engine). The signature has no
params, so options are fixed per logged model.

The rows of one request, and concurrent requests, are generated together by the model's one
onnxruntime-genai engine. `predict_stream` streams one prompt's text as it is generated.

Loading and generation come from `onnx_genai_runtime`, which is logged with the model
(`code_paths`): a server loads it without slmops installed (mlflow, numpy, pandas and
onnxruntime-genai are all it needs).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
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
PROMPT_COLUMN = "prompt"


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


class OnnxPromptModel(PythonModel):
    """Phi-3 on onnxruntime-genai: `{prompt: string}` rows -> generated strings."""

    def load_context(self, context: PythonModelContext) -> None:
        config = dict(context.model_config or {})
        self._runtime = runtime.OnnxGenerator.from_config(
            runtime.onnx_folder(context.artifacts, config), config
        )
        self._max_new_tokens = int(config.get("max_new_tokens", runtime.DEFAULT_MAX_NEW_TOKENS))
        self._temperature = float(config.get("temperature", runtime.DEFAULT_TEMPERATURE))

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
        # The rows reach the engine together: it batches them.
        return [turn.run() for turn in self._turns(encoded)]

    def predict_stream(
        self,
        context: PythonModelContext,
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> Iterator[str]:
        """The generated text of one prompt, piece by piece as the engine makes it."""
        prompts = prompts_from_input(model_input)
        if len(prompts) != 1:
            raise MlflowException.invalid_parameter_value(
                f"predict_stream takes one prompt, got {len(prompts)}"
            )
        (turn,) = self._turns([self._encode(0, prompts[0])])
        yield from turn.deltas()

    def _turns(self, encoded: list[list[int]]) -> list[runtime.TextTurn]:
        specs = [runtime.TurnSpec(ids, self._max_new_tokens, self._temperature) for ids in encoded]
        return runtime.TextTurn.start(self._runtime, specs)

    def _encode(self, index: int, prompt: str) -> list[int]:
        input_ids = self._runtime.encode(prompt)
        if len(input_ids) >= self._runtime.context_length:
            raise MlflowException.invalid_parameter_value(
                f"prompt {index} has {len(input_ids)} tokens; {self._runtime.context_limit}"
            )
        return input_ids


mlflow.models.set_model(OnnxPromptModel())
