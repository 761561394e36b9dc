"""Log a transformers model by saving it straight into its place in a local artifact store.

`mlflow.transformers.log_model` saves the model into a temporary folder and then copies that
folder into the artifact store: every byte of the weights is written twice (2 x 7.6 GB per
release for Phi-3-mini, plus 7.6 GB of temporary disk). With MLflow 3's public LoggedModel API
the same model can be written once: `initialize_logged_model` creates the LoggedModel and its
artifact location, `mlflow.transformers.save_model` writes the flavor there, and
`finalize_logged_model` marks it READY; the run lists it as an output, as `log_model` does.

Only for a local artifact store (`file:` locations); any other store goes through `log_model`.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import mlflow
from mlflow import MlflowClient
from mlflow.entities import LoggedModelOutput, Param
from mlflow.models import Model


def local_artifact_dir(artifact_location: str) -> Path | None:
    """The folder of a `file:` (or plain path) artifact location, else None."""
    parsed = urlparse(artifact_location)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme == "" and artifact_location.startswith("/"):
        return Path(artifact_location)
    return None


def log_transformers_in_place(
    *,
    run_id: str,
    name: str,
    tags: Mapping[str, str],
    save_kwargs: Mapping[str, Any],
) -> Any:
    """`mlflow.transformers.log_model(name=..., **save_kwargs)` writing each byte once.

    Returns an object with `model_uri` and `model_id`, like `log_model`'s ModelInfo.
    """
    client = MlflowClient()
    # As `log_model` does: the model config becomes run params, and the model carries the run's.
    model_config = dict(save_kwargs.get("model_config") or {})
    if model_config:
        client.log_batch(run_id, params=[Param(k, str(v)) for k, v in model_config.items()])
    params = {k: str(v) for k, v in client.get_run(run_id).data.params.items()}
    model = mlflow.initialize_logged_model(
        name=name, source_run_id=run_id, tags=dict(tags), params=params
    )
    target = local_artifact_dir(model.artifact_location)
    if target is None:  # a remote store: the copy is an upload anyway
        mlflow.finalize_logged_model(model.model_id, "FAILED")
        client.delete_logged_model(model.model_id)
        return mlflow.transformers.log_model(name=name, tags=dict(tags), **save_kwargs)
    try:
        if target.exists() and not any(target.iterdir()):
            target.rmdir()  # save_model wants to create the folder itself
        mlflow_model = Model(
            artifact_path=model.artifact_location,
            model_uuid=model.model_id,
            run_id=run_id,
            model_id=model.model_id,
        )
        mlflow.transformers.save_model(path=str(target), mlflow_model=mlflow_model, **save_kwargs)
        client.log_outputs(run_id=run_id, models=[LoggedModelOutput(model.model_id, step=0)])
        mlflow.finalize_logged_model(model.model_id, "READY")
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        mlflow.finalize_logged_model(model.model_id, "FAILED")
        raise
    return InPlaceModelInfo(model_id=model.model_id, model_uri=f"models:/{model.model_id}")


@dataclass(frozen=True)
class InPlaceModelInfo:
    """The part of `log_model`'s ModelInfo the tasks use."""

    model_id: str
    model_uri: str
