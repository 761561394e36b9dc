"""The one retry predicate of every task: retry what may pass on its own, nothing else.

A whitelist: network trouble, timeouts, a hub or server answering 5xx/408/429, a busy SQLite
store, and the project's own `TransientError`s. Everything else (bad input, a refusal, an
`ExplainedError`) fails at once: retrying it would only delay the message. Causes are followed
(`raise ... from`), since libraries wrap an outage in errors of their own.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from mlflow.exceptions import MlflowException

from slmops.errors import ExplainedError, TransientError

RETRYABLE_STATUS = frozenset({408, 429})
# huggingface_hub 2.4 talks through httpx2, older releases through httpx, MLflow's REST client
# through requests: each one's transport errors are network trouble.
TRANSPORT_ERRORS: tuple[type[BaseException], ...] = tuple(
    importlib.import_module(module).__dict__[name]
    for module, name in (
        ("httpx2", "TransportError"),
        ("httpx", "TransportError"),
        ("requests.exceptions", "ConnectionError"),
        ("requests.exceptions", "Timeout"),
    )
    if importlib.util.find_spec(module.split(".")[0]) is not None
)
_REFUSALS = (
    GatedRepoError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
    RemoteEntryNotFoundError,
    OfflineModeIsEnabled,
)
_BUSY_STORE = ("database is locked", "database table is locked")


def is_transient(error: BaseException) -> bool:
    """Whether retrying may help (see the module docstring)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, TransientError):
            return True
        if isinstance(current, (ExplainedError, *_REFUSALS)):
            return False
        if isinstance(current, HfHubHTTPError):
            status = http_status(current)
            return status is not None and (status >= 500 or status in RETRYABLE_STATUS)
        if isinstance(current, (TimeoutError, ConnectionError, *TRANSPORT_ERRORS)):
            return True
        # huggingface_hub's own check that a download got the announced size.
        if isinstance(current, OSError) and str(current).startswith("Consistency check failed"):
            return True
        if isinstance(current, MlflowException) and _store_is_busy(current):
            return True
        if any(text in str(current) for text in _BUSY_STORE):  # sqlite3 / SQLAlchemy
            return True
        current = current.__cause__
    return False


def retry_if_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's `retry_condition_fn`: retry a failed run only if its error is transient."""
    try:
        error = state.result(raise_on_failure=False)
    except Exception:
        return False
    return isinstance(error, BaseException) and is_transient(error)


def http_status(error: BaseException) -> int | None:
    response = getattr(error, "response", None)
    return getattr(response, "status_code", None)


def _store_is_busy(error: MlflowException) -> bool:
    # A tracking server that is down or overloaded, or a SQLite store another writer holds.
    code = getattr(error, "error_code", "")
    return code in {"TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"} or any(
        text in str(error) for text in _BUSY_STORE
    )
