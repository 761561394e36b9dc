"""The MLflow store a pipeline talks to: where its runs, models and registry live.

Tasks take a `ModelStore` instead of a tracking URI and get their clients from it, so there is
one place that knows how to reach the store (and, later, how to lock it across hosts or where
its artifacts go). It is a small frozen model: a Prefect task parameter that hashes by its URIs,
so cache keys stay keyed on the store.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from slmops.config import Settings, sqlite_path

# MLflow's fluent API reads one process-wide tracking URI. `ModelStore.activated` sets it for
# one block under this lock, so two tasks in one process using different stores cannot
# interleave.
_FLUENT_LOCK = threading.RLock()


class ModelStore(BaseModel):
    """An MLflow tracking store and its model registry.

    Args:
        tracking_uri: runs, LoggedModels and their artifacts.
        registry_uri: registered models (empty: the tracking store's own registry).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    tracking_uri: str
    registry_uri: str = Field(default="", validate_default=True)

    @field_validator("registry_uri")
    @classmethod
    def _registry_of_the_tracking_store(cls, value: str, info: ValidationInfo) -> str:
        # Resolved here, so that a store named with and without its default registry is one
        # store (and one cache key), and no client falls back on a process-wide registry URI.
        return value or info.data.get("tracking_uri", "")

    @classmethod
    def from_settings(cls, settings: Settings) -> ModelStore:
        """The store `settings` name (MLFLOW_TRACKING_URI, or SQLite in SLMOPS_HOME)."""
        return cls(tracking_uri=settings.tracking_uri)

    def client(self) -> MlflowClient:
        """A client of this store's tracking server and registry."""
        return MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.registry_uri)

    @contextlib.contextmanager
    def activated(self) -> Iterator[None]:
        """Point MLflow's fluent tracking API (`mlflow.start_run`, `log_model`, ...) at this
        store for one block, then restore the previous tracking URI."""
        with _FLUENT_LOCK:
            previous = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
            mlflow.set_tracking_uri(self.tracking_uri)
            try:
                yield
            finally:
                mlflow.set_tracking_uri(previous)  # type: ignore[arg-type]  # None unsets it

    @property
    def database(self) -> Path | None:
        """The database file of a SQLite store; None for any other store."""
        return sqlite_path(self.tracking_uri)

    @property
    def artifact_location(self) -> str | None:
        """Where new experiments keep their artifacts: beside a SQLite store's database
        (MLflow's default is ./mlruns of the current directory, wherever the process happens
        to run); None (MLflow's default) for other stores."""
        database = self.database
        return (database.parent / "mlartifacts").as_uri() if database is not None else None

    def environment(self) -> dict[str, str]:
        """The variables that point a child process (`mlflow models serve`) at this store."""
        return {"MLFLOW_TRACKING_URI": self.tracking_uri, "MLFLOW_REGISTRY_URI": self.registry_uri}
