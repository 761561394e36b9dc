"""Served models to benchmark: the release's own servers, or the mid-size model served alike.

`release_models` reads the endpoints a release run left in `$SLMOPS_HOME/servers/*.json`.
`serving_midsize` logs the mid-size model with the project's tasks (`log_onnx_prompt_model`,
`log_chat_pipeline`, called via `.fn`), starts `mlflow models serve` on 127.0.0.1 with
`tasks.serving.launch_server` (as the release does), and stops the servers on exit.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from benchmarks.sandbox import ReleaseSandbox
from slmops.config import GenerationSpec, OnnxExportSpec, WrapperKind
from slmops.store import ModelStore

MIDSIZE_MAX_NEW_TOKENS = 32


@dataclass(frozen=True)
class ServedModel:
    label: str  # e.g. "tiny prompt-onnx"
    kind: WrapperKind
    url: str
    model_uri: str
    store: ModelStore
    max_new_tokens: int  # what the logged model generates per request

    def folder(self) -> Path:
        """The served model's files on local disk (the local artifact store: no copy)."""
        import mlflow

        client = self.store.client()
        ref = self.model_uri.removeprefix("models:/")
        if ref.startswith("m-"):
            model_id = ref
        else:
            name, number = ref.split("/")
            version = client.get_model_version(name, number)
            # The version's source is the logged model it was registered from: models:/m-...
            model_id = version.model_id or version.source.removeprefix("models:/")
        location = client.get_logged_model(model_id).artifact_location
        return Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=location, tracking_uri=self.store.tracking_uri
            )
        )

    def onnx_folder(self) -> Path:
        """The onnxruntime-genai folder inside a served ONNX pyfunc."""
        found = sorted(self.folder().glob("artifacts/*/genai_config.json"))
        if not found:
            raise FileNotFoundError(f"no onnxruntime-genai folder in {self.model_uri}")
        return found[0].parent


def request_body(model: ServedModel, prompt: str, messages: list[dict[str, str]]) -> dict:
    if model.kind is WrapperKind.PROMPT_ONNX:
        return {"dataframe_records": [{"prompt": prompt}]}
    return {"messages": messages, "max_tokens": model.max_new_tokens}


def answer_of(model: ServedModel, response: httpx.Response) -> str:
    from tasks.serving import answer_text

    return answer_text(model.kind, response.json())


def release_models(sandbox: ReleaseSandbox) -> list[ServedModel]:
    """The models the release run in `sandbox` serves (tiny Phi-3)."""
    from flows.release import load_config

    config = load_config(str(_deployment()))
    store = ModelStore(tracking_uri=f"sqlite:///{sandbox.home / 'mlflow.db'}")
    models = []
    for handle in sorted(sandbox.server_handles(), key=lambda h: h.name):
        models.append(
            ServedModel(
                label=f"tiny {handle.kind.value}",
                kind=handle.kind,
                url=handle.url,
                model_uri=handle.model_uri,
                store=store,
                max_new_tokens=config.generation.max_new_tokens,
            )
        )
    return models


def _deployment() -> Path:
    from benchmarks.recording import REPO_ROOT
    from benchmarks.sandbox import DEPLOYMENT

    return REPO_ROOT / DEPLOYMENT


def log_midsize(
    store: ModelStore,
    kind: WrapperKind,
    max_new_tokens: int = MIDSIZE_MAX_NEW_TOKENS,
    engine_threads: int | None = None,
) -> str:
    """Log the mid-size model as `kind` with the project's task; return its model URI."""
    from prefect.logging import disable_run_logger

    from benchmarks.midsize import ensure_midsize
    from tasks.mlflow_models import log_chat_pipeline, log_onnx_chat_model, log_onnx_prompt_model

    model = ensure_midsize()
    generation = GenerationSpec(max_new_tokens=max_new_tokens, engine_threads=engine_threads)
    source = {"repo_id": "slmops-bench/phi3-mid", "commit": "0" * 40}
    with disable_run_logger():
        if kind is WrapperKind.CHAT_TRANSFORMERS:
            ref = log_chat_pipeline.fn(store, "bench", model.hf_dir, generation, dict(source))
        elif kind is WrapperKind.PROMPT_ONNX:
            ref = log_onnx_prompt_model.fn(
                store,
                "bench",
                model.onnx_int4_dir,
                generation,
                OnnxExportSpec(),
                dict(source),
            )
        else:
            ref = log_onnx_chat_model.fn(
                store, "bench", model.onnx_int4_dir, generation, OnnxExportSpec(), dict(source)
            )
    return ref.model_uri


@contextlib.contextmanager
def serving_midsize(
    kinds: Sequence[WrapperKind] = (WrapperKind.PROMPT_ONNX, WrapperKind.CHAT_TRANSFORMERS),
    max_new_tokens: int = MIDSIZE_MAX_NEW_TOKENS,
) -> Iterator[list[ServedModel]]:
    """Log and serve the mid-size model as each of `kinds`; stop the servers afterwards."""
    from tasks.serving import _free_port, launch_server, terminate

    root = Path(tempfile.mkdtemp(prefix="slmops-bench-mid-"))
    store = ModelStore(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    handles: list[Any] = []
    try:
        models = []
        for kind in kinds:
            uri = log_midsize(store, kind, max_new_tokens)
            handle = launch_server(
                uri,
                f"mid-{kind.value}",
                kind,
                "127.0.0.1",
                _free_port("127.0.0.1"),
                root / "servers",
                store,
                300.0,
            )
            handles.append(handle)
            models.append(
                ServedModel(
                    label=f"mid {kind.value}",
                    kind=kind,
                    url=handle.url,
                    model_uri=uri,
                    store=store,
                    max_new_tokens=max_new_tokens,
                )
            )
        yield models
    finally:
        for handle in handles:
            terminate(handle)
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def serving_release() -> Iterator[list[ServedModel]]:
    """Run the release once in a fresh sandbox (model prebuilt) and yield its served models."""
    from benchmarks.sandbox import prebuilt_embedded

    with ReleaseSandbox("serve", prebuilt_embedded=prebuilt_embedded()) as sandbox:
        run = sandbox.run()
        if run.returncode != 0:
            raise RuntimeError(f"release run failed ({run.returncode}):\n{run.log_tail}")
        yield release_models(sandbox)
