"""Log the three MLflow models of a release: the transformers chat pipeline and two ONNX pyfuncs.

Each task opens one run, logs the source and options as params and tags, logs the model with the
MLflow 3 API and returns a `LoggedModelRef`. If anything fails the run ends FAILED, is tagged
`slmops.candidate=false` with the reason, and any LoggedModel it created is deleted, so nothing
half-logged can be picked up as a release candidate. A snapshot that is not a causal LM is
rejected before any run is opened.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Param, RunStatus
from mlflow.exceptions import MlflowException
from prefect import task
from prefect.cache_policies import INPUTS, TASK_SOURCE, CachePolicy
from prefect.context import TaskRunContext
from prefect.runtime import flow_run as prefect_flow_run

from slmops import onnx_chat_model, onnx_genai_runtime, onnx_prompt_model, tags
from slmops.config import GenerationSpec, OnnxExportSpec, WrapperKind
from slmops.errors import ExplainedError, TransientError
from slmops.refs import LoggedModelRef
from slmops.signatures import expected_signature, input_example
from slmops.store import ModelStore
from tasks.caching import WhileResultIsLive, logged_model_exists
from tasks.inplace_logging import log_transformers_in_place
from tasks.onnx_export import validate_onnx_folder
from tasks.retrying import is_transient, retry_if_transient

# Re-exported for callers that read them with the tasks of this module.
CANDIDATE_TAG = tags.CANDIDATE
KIND_TAG = tags.KIND
FAILURE_TAG = tags.FAILURE
FLOW_RUN_TAG = tags.FLOW_RUN  # how a killed release's runs are found again
SOURCE_KEYS = ("repo", "commit")
_WRAPPER_FILES = {
    WrapperKind.PROMPT_ONNX: Path(onnx_prompt_model.__file__),
    WrapperKind.CHAT_ONNX: Path(onnx_chat_model.__file__),
}
# Shipped with both ONNX wrappers (MLflow `code_paths`): their loading and generation code.
_RUNTIME_FILE = Path(onnx_genai_runtime.__file__)
_log = logging.getLogger(__name__)


class SnapshotError(ValueError):
    """The snapshot folder is not a Hugging Face causal language model."""


class ArtifactStoreError(ExplainedError):
    """The tracking store took the run, but the artifact store behind it refused the model's
    files (an MLflow server's `--artifacts-destination`, or S3 reached directly)."""


class ArtifactStoreUnavailableError(ArtifactStoreError, TransientError):
    """The artifact store could not be reached or answered 5xx: the task retries it."""


# MLflow's artifact proxy (`mlflow-artifacts:` URIs through `mlflow server`), or S3 reached
# directly through boto3.
_ARTIFACT_STORE_MARKERS = ("mlflow-artifacts", "S3UploadFailedError")
_ARTIFACT_STORE_MODULES = ("botocore", "boto3", "s3transfer")
_UNAVAILABLE_MARKERS = ("error responses", "Max retries exceeded", "Connection refused")


def artifact_store_failure(error: BaseException, store: ModelStore) -> ArtifactStoreError | None:
    """`error` as an explained artifact-store failure, or None if the artifact store is not
    what failed. The original error stays chained as the cause."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if type(current).__module__.startswith(_ARTIFACT_STORE_MODULES) or any(
            marker in str(current) for marker in _ARTIFACT_STORE_MARKERS
        ):
            break
        current = current.__cause__ or current.__context__
    else:
        return None
    full = " ".join(str(error).split())
    detail = full[:300]
    # MLflow's REST client gives up on a proxy that keeps answering 5xx or cannot be reached
    # with a plain MlflowException: these say the store is down, not that it refused.
    unavailable = is_transient(error) or any(marker in full for marker in _UNAVAILABLE_MARKERS)
    kind = ArtifactStoreUnavailableError if unavailable else ArtifactStoreError
    return kind(
        f"the artifact store behind {store.tracking_uri} could not store the model's files "
        f"({'unreachable or failing' if unavailable else 'refused'}: {detail}). The tracking "
        "server answers, so check what stores its artifacts (`mlflow server "
        "--artifacts-destination`: the S3 endpoint, bucket and credentials), then run the "
        "release again; nothing was registered or promoted"
    )


def experiment_id(store: ModelStore, name: str) -> str:
    """The id of experiment `name` in `store`, created (artifacts at the store's default
    location) if absent."""
    client = store.client()
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=store.artifact_location)
    except MlflowException:  # created concurrently
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def check_causal_lm(snapshot_dir: Path) -> str:
    """The causal-LM architecture of `snapshot_dir`, or a SnapshotError saying what is wrong."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config_path = snapshot_dir / "config.json"
    if not config_path.is_file():
        raise SnapshotError(f"{snapshot_dir} is not a Hugging Face model folder: no config.json")
    try:
        config = json.loads(config_path.read_text())
    except ValueError as error:
        raise SnapshotError(f"{config_path} is not valid JSON: {error}") from error
    architectures = config.get("architectures") or []
    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    found = [a for a in architectures if a in causal or a.endswith("ForCausalLM")]
    if not found:
        raise SnapshotError(
            f"{snapshot_dir} is not a causal language model: config.json has model_type "
            f"{config.get('model_type')!r} and architectures {architectures or 'none'}; "
            "a text-generation pipeline needs e.g. Phi3ForCausalLM"
        )
    if not any((snapshot_dir / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        raise SnapshotError(f"{snapshot_dir} has no tokenizer (tokenizer.json or tokenizer.model)")
    return found[0]


def _check_source(source: Mapping[str, str]) -> dict[str, str]:
    """`repo` (or `repo_id`, as the hub task names it) and `commit`, plus any other keys."""
    normalized = {k: str(v) for k, v in source.items() if v is not None}
    if "repo" not in normalized and "repo_id" in normalized:
        normalized["repo"] = normalized.pop("repo_id")
    missing = [key for key in SOURCE_KEYS if not normalized.get(key)]
    if missing:
        raise ValueError(f"source must name {', '.join(SOURCE_KEYS)}; missing {missing}")
    return normalized


def _pinned(*packages: str) -> list[str]:
    # Explicit requirements: MLflow's inference runs the model in a subprocess (slow), and its
    # transformers defaults require torchvision, which this project does not install.
    pins = []
    for package in packages:
        try:
            pins.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            pins.append(package)
    return pins


def _wrapper_code(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    # The models-from-code files are what gets logged, so they belong in the cache key beside
    # the task's own source.
    digest = hashlib.sha256()
    for path in sorted([*_WRAPPER_FILES.values(), _RUNTIME_FILE]):
        digest.update(path.read_bytes())
    return digest.hexdigest()


# Reused only while the logged model it returned is still in the store.
LOG_CACHE_POLICY = WhileResultIsLive(
    base=INPUTS + TASK_SOURCE + CachePolicy.from_cache_key_fn(_wrapper_code),
    is_live=lambda ref, inputs: logged_model_exists(inputs["store"], ref.model_id),
)
_TASK_OPTIONS: dict[str, Any] = dict(
    cache_policy=LOG_CACHE_POLICY,
    persist_result=True,
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=retry_if_transient,
)


@contextlib.contextmanager
def candidate_run(
    store: ModelStore,
    experiment: str,
    kind: WrapperKind,
    params: Mapping[str, Any],
    tags: Mapping[str, str],
) -> Iterator[str]:
    """A run that becomes a candidate only if its block completes; yields the run id.

    On failure the run ends FAILED, is tagged non-candidate with the reason, and the
    LoggedModels it produced are deleted.
    """
    client = store.client()
    with store.activated():
        exp_id = experiment_id(store, experiment)
        run = client.create_run(
            exp_id,
            run_name=f"log-{kind.value}",
            tags={
                **tags,
                KIND_TAG: kind.value,
                CANDIDATE_TAG: "pending",
                FLOW_RUN_TAG: prefect_flow_run.id or "",
            },
        )
        run_id = run.info.run_id
        try:
            client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])
            with mlflow.start_run(run_id=run_id):
                yield run_id
        except BaseException as error:
            _discard(client, exp_id, run_id, error)
            explained = artifact_store_failure(error, store)
            if explained is not None:
                raise explained from error
            raise
        client.set_tag(run_id, CANDIDATE_TAG, "true")


def _discard(client: MlflowClient, exp_id: str, run_id: str, error: BaseException) -> None:
    """Leave a failed run that no one can mistake for a candidate (best effort: the original
    error is what the caller must see, even if the store is what failed)."""
    try:
        client.set_tag(run_id, CANDIDATE_TAG, "false")
        client.set_tag(run_id, FAILURE_TAG, f"{type(error).__name__}: {error}"[:5000])
        for model in client.search_logged_models(
            experiment_ids=[exp_id], filter_string=f"source_run_id = '{run_id}'"
        ):
            client.delete_logged_model(model.model_id)
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))
    except Exception:
        _log.exception("could not mark run %s as failed", run_id)


def _source_params(source: Mapping[str, str]) -> dict[str, str]:
    return {f"source.{key}": value for key, value in _check_source(source).items()}


def _generation_params(generation: GenerationSpec) -> dict[str, Any]:
    return {f"generation.{k}": v for k, v in generation.model_dump().items()}


def _source_tags(source: Mapping[str, str]) -> dict[str, str]:
    checked = _check_source(source)
    return {f"{tags.SOURCE_PREFIX}{key}": checked[key] for key in SOURCE_KEYS}


def _ref(info: Any, run_id: str, kind: WrapperKind) -> LoggedModelRef:
    return LoggedModelRef(
        model_uri=info.model_uri, run_id=run_id, kind=kind, model_id=info.model_id
    )


@task(**_TASK_OPTIONS)
def log_chat_pipeline(
    store: ModelStore,
    experiment: str,
    snapshot_dir: Path,
    generation: GenerationSpec,
    source: dict[str, str],
) -> LoggedModelRef:
    """Log the snapshot as a transformers text-generation pipeline with task llm/v1/chat.

    The weights are stored in the model (`save_pretrained=True`): the snapshot is local, and a
    hub reference would make the model unusable offline.

    Args:
        store: the MLflow store to log into.
        experiment: experiment name (created if absent).
        snapshot_dir: Hugging Face snapshot folder of a causal LM.
        generation: defaults baked into the model config.
        source: `repo` (or `repo_id`) and `commit` the snapshot came from; other keys, such
            as `revision`, are logged too.
    """
    kind = WrapperKind.CHAT_TRANSFORMERS
    architecture = check_causal_lm(snapshot_dir)
    params = {**_source_params(source), **_generation_params(generation)}
    params["architecture"] = architecture
    with candidate_run(store, experiment, kind, params, _source_tags(source)) as run_id:
        model_config: dict[str, Any] = {
            "max_new_tokens": generation.max_new_tokens,
            "do_sample": generation.do_sample,
        }
        if generation.do_sample:
            model_config["temperature"] = generation.temperature
        # Saved straight into the artifact store (weights written once, not saved to a temp
        # folder and copied), by a child process for a big checkpoint (its memory goes back
        # when it exits): tasks/inplace_logging.py.
        info = log_transformers_in_place(
            run_id=run_id,
            name=kind.value,
            tags={KIND_TAG: kind.value, **_source_tags(source)},
            snapshot_dir=snapshot_dir,
            save_kwargs=dict(
                task="llm/v1/chat",
                model_config=model_config,
                # No input_example: MLflow would reload the saved weights (a second copy in
                # memory) and generate to check it, measured at 2.3x the weights' size in peak
                # RSS and most of the logging time (benchmarks/logging_cost.py). The llm/v1/chat
                # task defines the signature; validate_serving_example replays the example.
                save_pretrained=True,
                pip_requirements=_pinned("transformers", "torch", "accelerate"),
            ),
        )
    return _ref(info, run_id, kind)


@contextlib.contextmanager
def resolved_folder(folder: Path) -> Iterator[Path]:
    """`folder` itself, or a temporary copy of it with its symlinks resolved.

    A hub snapshot (the ONNX release fetched with `onnx.source: hub`) is a folder of symlinks
    into the Hugging Face cache's blobs/, which MLflow refuses to log ("resolved path is outside
    the artifact directory").
    """
    if not any(path.is_symlink() for path in folder.rglob("*")):
        yield folder
        return
    with tempfile.TemporaryDirectory(prefix="onnx-artifact-") as tmp:
        copy = Path(tmp) / folder.name
        shutil.copytree(folder, copy, symlinks=False)
        yield copy


def _log_onnx_pyfunc(
    kind: WrapperKind,
    store: ModelStore,
    experiment: str,
    onnx_dir: Path,
    generation: GenerationSpec,
    export: OnnxExportSpec,
    source: Mapping[str, str],
    onnx_artifact_uri: str | None = None,
) -> LoggedModelRef:
    validate_onnx_folder(onnx_dir)
    params = {
        **_source_params(source),
        **_generation_params(generation),
        **{f"onnx.{k}": v for k, v in export.model_dump().items()},
    }
    model_config: dict[str, Any] = {
        "max_new_tokens": generation.max_new_tokens,
        "temperature": generation.temperature,
        onnx_genai_runtime.MAX_BATCH_SIZE_KEY: generation.engine_max_batch_size,
        onnx_genai_runtime.TOKEN_BUDGET_KEY: generation.engine_token_budget,
    }
    if generation.engine_threads is not None:  # else decided where the model is loaded
        model_config[onnx_genai_runtime.THREADS_KEY] = generation.engine_threads
    if kind is WrapperKind.CHAT_ONNX:
        model_config["model_name"] = _check_source(source)["repo"]
    if onnx_artifact_uri:
        # The release's one stored copy (tasks/onnx_storage.py): nothing to copy here.
        model_config[onnx_prompt_model.ONNX_URI_KEY] = onnx_artifact_uri
        params["onnx.artifact_uri"] = onnx_artifact_uri
    with (
        candidate_run(store, experiment, kind, params, _source_tags(source)) as run_id,
        (
            contextlib.nullcontext(onnx_dir) if onnx_artifact_uri else resolved_folder(onnx_dir)
        ) as artifact_dir,
    ):
        info = mlflow.pyfunc.log_model(
            name=kind.value,
            python_model=str(_WRAPPER_FILES[kind]),
            code_paths=[str(_RUNTIME_FILE)],
            artifacts=None
            if onnx_artifact_uri
            else {onnx_prompt_model.ARTIFACT_KEY: str(artifact_dir)},
            model_config=model_config,
            signature=expected_signature(kind),
            input_example=input_example(kind),
            pip_requirements=_pinned("mlflow", "onnxruntime-genai", "numpy", "pandas"),
            tags={KIND_TAG: kind.value, **_source_tags(source)},
            streamable=True,  # predict_stream (a model from code is not inspected for it)
        )
    _forget_last_model_from_code()
    return _ref(info, run_id, kind)


def _forget_last_model_from_code() -> None:
    """Drop MLflow's reference to the last model loaded from code.

    `log_model` loads the model to check its input example, and MLflow's `set_model` keeps the
    instance in a module global (`__mlflow_model__`) until another model from code is loaded:
    the flow would hold the ONNX model it just logged (3.5 GB for Phi-3-mini, measured).
    """
    import mlflow.models.model as model_module

    vars(model_module).pop("__mlflow_model__", None)
    gc.collect()  # the chat model is part of a reference cycle: free it now, not some day


@task(**_TASK_OPTIONS)
def log_onnx_prompt_model(
    store: ModelStore,
    experiment: str,
    onnx_dir: Path,
    generation: GenerationSpec,
    export: OnnxExportSpec,
    source: dict[str, str],
    onnx_artifact_uri: str | None = None,
) -> LoggedModelRef:
    """Log the onnxruntime-genai folder as the `{prompt} -> string` pyfunc (models from code).

    Args:
        store: the MLflow store to log into.
        experiment: experiment name (created if absent).
        onnx_dir: onnxruntime-genai model folder (built, or the hub release's subfolder).
        generation: defaults baked into the model config.
        export: how the folder was obtained (logged as params).
        source: `repo` (or `repo_id`) and `commit` the folder came from.
        onnx_artifact_uri: the release's stored ONNX folder (`store_onnx_folder`) to reference
            instead of copying `onnx_dir` into the model.
    """
    return _log_onnx_pyfunc(
        WrapperKind.PROMPT_ONNX, store, experiment, onnx_dir, generation, export, source,
        onnx_artifact_uri,
    )  # fmt: skip


@task(**_TASK_OPTIONS)
def log_onnx_chat_model(
    store: ModelStore,
    experiment: str,
    onnx_dir: Path,
    generation: GenerationSpec,
    export: OnnxExportSpec,
    source: dict[str, str],
    onnx_artifact_uri: str | None = None,
) -> LoggedModelRef:
    """Log the onnxruntime-genai folder as an llm/v1/chat pyfunc with the transformers signature.

    Args:
        store: the MLflow store to log into.
        experiment: experiment name (created if absent).
        onnx_dir: onnxruntime-genai model folder (built, or the hub release's subfolder).
        generation: defaults baked into the model config.
        export: how the folder was obtained (logged as params).
        source: `repo` (or `repo_id`) and `commit` the folder came from.
        onnx_artifact_uri: the release's stored ONNX folder (`store_onnx_folder`) to reference
            instead of copying `onnx_dir` into the model.
    """
    return _log_onnx_pyfunc(
        WrapperKind.CHAT_ONNX, store, experiment, onnx_dir, generation, export, source,
        onnx_artifact_uri,
    )  # fmt: skip
