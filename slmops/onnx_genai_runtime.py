"""Loading and greedy/sampled generation on onnxruntime-genai, shared by both ONNX pyfuncs.

The two models-from-code files (`onnx_prompt_model.py`, `onnx_chat_model.py`) log this file
with them through MLflow's `code_paths`, so a served model carries the exact generation loop it
was validated with and needs no slmops installed; validation's runtime comparison uses it too.
Dependencies: mlflow and onnxruntime-genai only.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException

ARTIFACT_KEY = "onnx_model"  # the model's own copy of the folder (a model logged alone)
ONNX_URI_KEY = "onnx_model_uri"  # model_config key: the release's one stored folder
DEFAULT_MAX_NEW_TOKENS = 300
DEFAULT_TEMPERATURE = 0.0


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
    """One loaded onnxruntime-genai model and its tokenizer.

    The model is shared read-only across requests; each generation gets its own generator.
    Tokenizer calls are serialized: not documented as thread-safe, and cheap.
    """

    def __init__(self, folder: Path) -> None:
        import onnxruntime_genai as og

        genai_config = json.loads((folder / "genai_config.json").read_text())
        self.folder = folder
        self.context_length = int(genai_config["model"]["context_length"])
        self._model = og.Model(str(folder))
        self._tokenizer = og.Tokenizer(self._model)
        self.eos_ids = frozenset(int(t) for t in self._tokenizer.eos_token_ids)
        self._tokenizer_lock = threading.Lock()

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
