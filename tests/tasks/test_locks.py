"""Both registry lock paths serialise holders: file locks (one host) and Prefect concurrency limits
(through the Prefect API, across hosts). Holders are threads with their own lock objects."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from slmops.config import RegistryLockSpec, Settings
from tasks.locks import LockSetupError, hold_lock, limit_name

pytestmark = pytest.mark.integration


def _spec(kind: str, tmp_path: Path, timeout_s: float) -> RegistryLockSpec:
    return RegistryLockSpec(kind=kind, folder=tmp_path / "locks", timeout_s=timeout_s)


@pytest.mark.parametrize("kind", ["file", "prefect"])
def test_a_second_holder_waits_for_the_first(kind, tmp_path, request):
    if kind == "prefect":
        request.getfixturevalue("prefect_harness")
    name = f"model-{kind}-{tmp_path.name}"
    held, release = threading.Event(), threading.Event()
    order: list[str] = []

    def first() -> None:
        with hold_lock(_spec(kind, tmp_path, 60), name):
            order.append("first in")
            held.set()
            release.wait(30)
            order.append("first out")

    thread = threading.Thread(target=first)
    thread.start()
    assert held.wait(60)
    # While the first holds it, a second holder with a short patience gives up.
    with pytest.raises(TimeoutError), hold_lock(_spec(kind, tmp_path, 2), name):
        pass
    # A patient one gets it once the first lets go, and not before.
    threading.Timer(1.0, release.set).start()
    started = time.monotonic()
    with hold_lock(_spec(kind, tmp_path, 60), name):
        order.append("second in")
    thread.join(30)
    assert order == ["first in", "first out", "second in"]
    assert time.monotonic() - started >= 0.9
    # Another model's lock is independent.
    with hold_lock(_spec(kind, tmp_path, 2), f"{name}-other"):
        pass


def test_a_shared_limit_with_more_than_one_slot_is_refused(prefect_harness):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    name = "misconfigured-model"
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(
            GlobalConcurrencyLimitCreate(name=limit_name(name), limit=2)
        )
    with (
        pytest.raises(LockSetupError, match="2 slot"),
        hold_lock(RegistryLockSpec(kind="prefect", timeout_s=5), name),
    ):
        pass


@pytest.mark.unit
def test_settings_choose_the_lock_path():
    assert Settings.from_env({"SLMOPS_HOME": "/h"}).registry_locks == RegistryLockSpec(
        kind="file", folder=Path("/h/locks")
    )
    shared = Settings.from_env({"SLMOPS_HOME": "/h", "SLMOPS_REGISTRY_LOCKS": "prefect"})
    assert shared.registry_locks.kind == "prefect"
    with pytest.raises(ValueError, match="folder"):
        RegistryLockSpec(kind="file")
