"""Registered versions of a trivial echo model in a real MLflow store, for registry and serving
tests that need a model but not a language model."""

from __future__ import annotations

from pathlib import Path

import mlflow
from mlflow.models import infer_signature
from prefect.logging import disable_run_logger

from slmops.refs import ModelVersionRef
from slmops.store import ModelStore
from tasks.mlflow_models import experiment_id
from tasks.registry import register_version

ECHO_MODEL = Path(__file__).with_name("echo_model.py")


def log_echo_model(store: ModelStore) -> str:
    """Log the echo model into `store`; its logged model URI (`models:/m-...`)."""
    # A named experiment, whose artifacts go beside the database: the Default experiment of a
    # new SQLite store keeps them in ./mlruns of the current directory (the checkout).
    experiment = experiment_id(store, "echo")
    with store.activated(), mlflow.start_run(experiment_id=experiment):
        info = mlflow.pyfunc.log_model(
            name="echo",
            python_model=str(ECHO_MODEL),
            signature=infer_signature({"prompt": "hi"}, ["echo: hi"]),
            # Given, not inferred: MLflow infers requirements by loading the model in a
            # subprocess (~3.5 s a model here); served with --env-manager local, they are unused.
            pip_requirements=["mlflow"],
        )
    return info.model_uri


def register(store: ModelStore, name: str, passed: bool = True) -> ModelVersionRef:
    """A new version of `name` holding a freshly logged echo model, validated or not."""
    with disable_run_logger():
        return register_version.fn(
            store,
            log_echo_model(store),
            name,
            {"slmops.validation.passed": str(passed).lower()},
        )
