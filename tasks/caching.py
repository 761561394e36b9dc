"""Cache policies shared by the tasks: keys that cover the code that decides a result, and
cached results that are reused only while what they point at still exists.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from mlflow.exceptions import MlflowException
from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext
from prefect.utilities.hashing import hash_objects

from slmops.store import ModelStore

_log = logging.getLogger(__name__)


@dataclass
class SourceFiles(CachePolicy):
    """A key part: the bytes of some source files.

    `TASK_SOURCE` covers the task function's own lines only; a verdict also depends on the
    expectation suite, the expected signatures and the helpers it calls, and a change to any of
    them must not return a stale verdict.
    """

    paths: tuple[Path, ...] = ()

    def compute_key(
        self,
        task_ctx: TaskRunContext,
        inputs: dict[str, Any],
        flow_parameters: dict[str, Any],
        **kwargs: Any,
    ) -> str | None:
        hasher = hashlib.sha256()
        for path in self.paths:
            hasher.update(path.read_bytes())
        return hasher.hexdigest()


def source_of(*modules: ModuleType) -> SourceFiles:
    """The SourceFiles policy of `modules`' files."""
    return SourceFiles(paths=tuple(sorted(Path(str(m.__file__)) for m in modules)))


@dataclass
class WhileResultIsLive(CachePolicy):
    """`base`'s key while the result cached under it still points at something that exists.

    A cached result is a reference (a logged model, a run): if the store lost it (a deleted
    SLMOPS_HOME, a reset database, a model deleted in the UI), handing it out again fails the
    release further on. So the cached record is read and checked first; if it is stale, the key
    moves on to a next generation (`base` + 1, + 2, ...), under which the task runs again and
    caches its new result, and later runs find that one.

    Args:
        base: the policy giving the content key.
        is_live: whether a cached result (with the task's inputs) still points at what exists.
    """

    base: CachePolicy | None = None
    is_live: Callable[[Any, dict[str, Any]], bool] | None = None
    max_generations: int = 50

    def compute_key(
        self,
        task_ctx: TaskRunContext,
        inputs: dict[str, Any],
        flow_parameters: dict[str, Any],
        **kwargs: Any,
    ) -> str | None:
        if self.base is None or self.is_live is None:
            raise ValueError("WhileResultIsLive needs a base policy and an is_live check")
        key = self.base.compute_key(task_ctx, inputs, flow_parameters, **kwargs)
        if key is None:
            return None
        store = task_ctx.result_store
        for generation in range(self.max_generations):
            candidate = key if generation == 0 else hash_objects(key, generation)
            if candidate is None or not store.exists(candidate):
                return candidate
            try:
                cached = store.read(candidate).result
            except Exception:  # unreadable record: treat as stale
                _log.warning("cached result %s is unreadable; running again", candidate)
                continue
            if self.is_live(cached, inputs):
                return candidate
            _log.warning(
                "cached result of %s points at what no longer exists; running again",
                task_ctx.task.name,
            )
        return None  # give up caching rather than loop forever


def logged_model_exists(store: ModelStore, model_id: str) -> bool:
    """Whether `model_id` is a live LoggedModel (with its run) in `store`."""
    client = store.client()
    try:
        model = client.get_logged_model(model_id)
        if model.source_run_id:
            run = client.get_run(model.source_run_id)
            if run.info.lifecycle_stage != "active":
                return False
    except MlflowException:
        return False
    return str(getattr(model, "status", "")).upper().endswith("READY")


def run_exists(store: ModelStore, run_id: str) -> bool:
    """Whether `run_id` is an active run in `store`."""
    try:
        return store.client().get_run(run_id).info.lifecycle_stage == "active"
    except MlflowException:
        return False
