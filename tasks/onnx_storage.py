"""Store a release's onnxruntime-genai folder once in MLflow, for both ONNX wrappers to share.

Logged as `artifacts=`, each pyfunc would carry its own copy of the folder (2 x 2.7 GB per
release at Phi-3-mini's size), and MLflow writes each copy twice (a temporary save, then the
copy into the artifact store). Instead one run (`store-onnx`) logs the folder as a plain run
artifact, written once straight from the cache (symlinks of a hub snapshot followed), and the
wrappers name it in their `model_config` (`onnx_model_uri`); they resolve it when loaded, which
for a local artifact store is the stored folder itself, with no copy.

A folder is stored once per content: the run is found again by a tag holding the digest of the
folder's path (a content-addressed snapshot or export path) and export options, as long as its
artifacts still exist.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import RunStatus
from prefect import task
from pydantic import BaseModel, ConfigDict

from slmops.config import OnnxExportSpec
from slmops.store import ModelStore
from tasks.mlflow_models import artifact_store_failure, experiment_id
from tasks.onnx_export import validate_onnx_folder
from tasks.retrying import retry_if_transient

STORE_RUN_NAME = "store-onnx"
DIGEST_TAG = "slmops.onnx.folder_digest"
ARTIFACT_PATH = "onnx_model"


class OnnxArtifactRef(BaseModel):
    """Where a release's ONNX folder is stored in MLflow."""

    model_config = ConfigDict(frozen=True)

    artifact_uri: str  # what the wrappers' `onnx_model_uri` names
    run_id: str
    stored_bytes: int
    reused: bool = False  # found stored by an earlier release


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def folder_digest(onnx_dir: Path, export: OnnxExportSpec, source: dict[str, str]) -> str:
    key = {
        "folder": str(onnx_dir.resolve()),
        "export": export.model_dump(mode="json"),
        "commit": source.get("commit"),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _local_path(artifact_uri: str) -> Path | None:
    if artifact_uri.startswith("file://"):
        return Path(artifact_uri.removeprefix("file://"))
    if artifact_uri.startswith("/"):
        return Path(artifact_uri)
    return None


def _stored_run(client: MlflowClient, exp_id: str, digest: str) -> OnnxArtifactRef | None:
    runs = client.search_runs(
        [exp_id],
        filter_string=f"tags.`{DIGEST_TAG}` = '{digest}' and attributes.status = 'FINISHED'",
        max_results=5,
    )
    for run in runs:
        uri = f"{run.info.artifact_uri}/{ARTIFACT_PATH}"
        local = _local_path(uri)
        # A pruned or half-deleted store is not reused; a remote one is trusted.
        if local is not None and not (local / "genai_config.json").is_file():
            continue
        stored = int(run.data.metrics.get("onnx.stored_bytes", 0))
        return OnnxArtifactRef(
            artifact_uri=uri, run_id=run.info.run_id, stored_bytes=stored, reused=True
        )
    return None


@task(retries=2, retry_delay_seconds=5, retry_condition_fn=retry_if_transient)
def store_onnx_folder(
    store: ModelStore,
    experiment: str,
    onnx_dir: Path,
    export: OnnxExportSpec,
    source: dict[str, str],
) -> OnnxArtifactRef:
    """Store `onnx_dir` once as a run artifact (or find it stored) and return its URI.

    Args:
        store: the MLflow store to keep it in.
        experiment: experiment name (created if absent).
        onnx_dir: onnxruntime-genai model folder (a build, or the hub release's subfolder).
        export: how the folder was obtained (logged as params; part of the identity).
        source: `repo_id` (or `repo`) and `commit` the folder came from.
    """
    validate_onnx_folder(onnx_dir)
    client = store.client()
    exp_id = experiment_id(store, experiment)
    digest = folder_digest(onnx_dir, export, source)
    found = _stored_run(client, exp_id, digest)
    if found is not None:
        return found
    repo = source.get("repo_id") or source.get("repo") or ""
    run = client.create_run(
        exp_id,
        run_name=STORE_RUN_NAME,
        tags={
            DIGEST_TAG: digest,
            "slmops.source.repo": repo,
            "slmops.source.commit": source.get("commit", ""),
        },
    )
    run_id = run.info.run_id
    try:
        for key, value in export.model_dump().items():
            client.log_param(run_id, f"onnx.{key}", value)
        # log_artifacts copies the files the symlinks of a hub snapshot point at: one write.
        client.log_artifacts(run_id, str(onnx_dir), ARTIFACT_PATH)
        stored = folder_bytes(onnx_dir)
        client.log_metric(run_id, "onnx.stored_bytes", stored)
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))
    except BaseException as error:
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))
        explained = artifact_store_failure(error, store)
        if explained is not None:
            raise explained from error
        raise
    return OnnxArtifactRef(
        artifact_uri=f"{client.get_run(run_id).info.artifact_uri}/{ARTIFACT_PATH}",
        run_id=run_id,
        stored_bytes=stored,
    )
