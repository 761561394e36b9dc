"""Locks that serialise registry changes to one registered model, on one host or across hosts.

Two implementations of one call, `hold_lock(spec, name)`, chosen by `RegistryLockSpec.kind`:
- `file`: a `filelock` file per model in a folder, for the processes of one host (the default
  with the SQLite store in SLMOPS_HOME);
- `prefect`: a Prefect global concurrency limit of one slot per model, taken through the Prefect
  API that every worker shares, so two release runs on two hosts sharing one tracking server
  cannot interleave their moves. The slot is leased and renewed while held: a holder whose host
  dies frees it when the lease runs out (`spec.lease_s`), and a holder that loses its lease is
  stopped rather than left moving stages unlocked (`strict`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock

from slmops.config import RegistryLockSpec
from slmops.errors import ExplainedError

LIMIT_PREFIX = "slmops-registry-"


class LockSetupError(ExplainedError):
    """The shared lock exists but does not serialise (more than one slot, or inactive)."""


def limit_name(name: str) -> str:
    """The Prefect global concurrency limit that stands for the registry lock of `name`."""
    return f"{LIMIT_PREFIX}{name}"


@contextlib.contextmanager
def hold_lock(spec: RegistryLockSpec | Path | None, name: str) -> Iterator[None]:
    """Hold the registry lock of `name` for the block.

    Args:
        spec: how to lock; a folder means file locks there; None: no lock.
        name: the registered model.
    """
    if spec is None:
        yield
        return
    if isinstance(spec, Path):
        spec = RegistryLockSpec(kind="file", folder=spec)
    if spec.kind == "file":
        assert spec.folder is not None  # the spec's validator guarantees it
        spec.folder.mkdir(parents=True, exist_ok=True)
        with FileLock(spec.folder / f"{name}.lock", timeout=spec.timeout_s):
            yield
        return
    from prefect.concurrency.sync import concurrency

    limit = limit_name(name)
    ensure_single_slot_limit(limit)
    with concurrency(
        limit, occupy=1, timeout_seconds=spec.timeout_s, lease_duration=spec.lease_s, strict=True
    ):
        yield


def ensure_single_slot_limit(limit: str) -> None:
    """Create the one-slot limit `limit` if it is missing; refuse one that would not serialise.

    Two runs creating it at once are fine: the second gets a conflict and reads the first's.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            found = client.read_global_concurrency_limit_by_name(limit)
        except ObjectNotFound:
            with contextlib.suppress(ObjectAlreadyExists):
                client.create_global_concurrency_limit(
                    GlobalConcurrencyLimitCreate(name=limit, limit=1)
                )
            found = client.read_global_concurrency_limit_by_name(limit)
    if found.limit != 1 or not found.active:
        raise LockSetupError(
            f"the Prefect concurrency limit {limit!r} has {found.limit} slot(s) and is "
            f"{'active' if found.active else 'inactive'}: as a registry lock it must be one "
            "active slot. Fix it with `prefect gcl update` (or delete it: slmops recreates it)."
        )
