"""How the flows run: Prefect settings a fresh machine needs, and task results under SLMOPS_HOME.

Not a flow: the leading underscore keeps it apart from the one-flow-per-file modules.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prefect.context import FlowRunContext
from prefect.filesystems import LocalFileSystem
from prefect.settings import (
    PREFECT_SERVER_ANALYTICS_ENABLED,
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
    get_current_settings,
    temporary_settings,
)
from prefect.settings.legacy import Setting

from slmops.errors import ExplainedError

# On an empty PREFECT_HOME the temporary server creates and migrates its database before it
# answers: 25-35 s on 2 cores, past Prefect's 20 s default.
FIRST_RUN_STARTUP_TIMEOUT_S = 180


def command_line_settings() -> dict[Setting, Any]:
    """Prefect settings for `python -m flows.<name>` that the user has not set themselves.

    - The temporary server's start-up limit: long enough for a first run on a fresh machine.
    - The temporary server's telemetry: off. Offline it only fails, and while the new database
      is being created its heartbeat logs `database is locked` tracebacks.

    A value the user set (environment, profile, `.env`) is left alone.
    """
    current = get_current_settings()
    updates: dict[Setting, Any] = {}
    if "startup_timeout_seconds" not in current.server.ephemeral.model_fields_set:
        updates[PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS] = FIRST_RUN_STARTUP_TIMEOUT_S
    if "analytics_enabled" not in current.server.model_fields_set:
        updates[PREFECT_SERVER_ANALYTICS_ENABLED] = False
    return updates


class _ConciseExplainedErrors(logging.Filter):
    """Drop the traceback of an ExplainedError from Prefect's failure logs: the message is
    the whole story; a wall of frames above it only hides it."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if _explained(error) is not None:
            record.exc_info = None
            record.exc_text = None
        return True


def _explained(error: BaseException | None) -> ExplainedError | None:
    while error is not None:
        if isinstance(error, ExplainedError):
            return error
        error = error.__cause__
    return None


def run_from_command_line(run: Callable[[], Any]) -> Any:
    """Run a flow call as `python -m flows.<name>` does: fresh-machine settings, and an
    ExplainedError printed as one line (exit status 1) instead of a traceback."""
    concise = _ConciseExplainedErrors()
    # The console handlers only (Prefect's sit on the root logger): the copy sent to the
    # Prefect API, shown in the UI, keeps its traceback.
    handlers = list(logging.getLogger().handlers)
    for handler in handlers:
        handler.addFilter(concise)
    try:
        with temporary_settings(updates=command_line_settings()):
            return run()
    except Exception as error:
        explained = _explained(error)
        if explained is None:
            raise
        print(f"error: {explained}", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        for handler in handlers:
            handler.removeFilter(concise)


@contextlib.contextmanager
def task_results_under(folder: Path) -> Iterator[None]:
    """Persist the task results (and cache records) of the current flow run under `folder`.

    Prefect keeps them in `~/.prefect/storage` by default, outside the project's state: a
    cached result there would outlive a deleted SLMOPS_HOME and hand out models, runs and
    folders that no longer exist. Inside a flow run, this swaps the run's result store for one
    on `folder` (Prefect's own contexts are copied the same way); outside one it does nothing.
    """
    context = FlowRunContext.get()
    if context is None or context.result_store is None:
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    store = context.result_store.model_copy(
        update={"result_storage": LocalFileSystem(basepath=str(folder))}
    )
    with context.model_copy(update={"result_store": store}):
        yield
