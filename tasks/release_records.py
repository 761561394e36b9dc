"""Release runs in progress, and the clean-up after one whose process was killed.

A release run holds a lease file `<SLMOPS_HOME>/releases/<flow run id>.json` naming its
process (pid + start time) from start to end. A process that is killed (SIGKILL, OOM, power)
cannot clean up: its MLflow runs stay RUNNING with `slmops.candidate=pending` and its Prefect
flow run stays Running. The next release (or `serve status`) finds leases whose process is
gone and settles what they left: the MLflow runs of that flow run end KILLED, non-candidate,
their half-logged models deleted, and the Prefect flow run is set Crashed. Nothing registered,
promoted or served is touched: a killed run never promoted anything after its last audit.

Leases are per host (SLMOPS_HOME is), so a release on another host is never mistaken for dead.
A host that dies takes its leases with it; for that case the clean-up also goes through the
shared services alone: MLflow runs still `pending` whose Prefect flow run is already final
(set Crashed by Prefect's missing-heartbeat automation, see `zombie_automation`, or
cancelled) are settled the same way, from any host.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import psutil
from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException
from prefect import task
from pydantic import BaseModel, ConfigDict

from slmops import tags
from slmops.store import ModelStore

_log = logging.getLogger(__name__)


class ReleaseLease(BaseModel):
    """The process running one release flow run."""

    model_config = ConfigDict(frozen=True)

    flow_run_id: str
    pid: int
    process_started: float  # with the pid, tells this process from a later one reusing the pid
    store: ModelStore  # where the release's runs are

    def process_alive(self) -> bool:
        try:
            process = psutil.Process(self.pid)
            return (
                abs(process.create_time() - self.process_started) < 1.0
                and process.status() != psutil.STATUS_ZOMBIE
            )
        except psutil.NoSuchProcess:
            return False


class SettledRelease(BaseModel):
    """What the clean-up of one killed release changed."""

    model_config = ConfigDict(frozen=True)

    flow_run_id: str
    killed_runs: tuple[str, ...]
    flow_run_state: str | None  # the state set on the Prefect flow run, None if unchanged


def lease_dir(home: Path) -> Path:
    return home / "releases"


@contextlib.contextmanager
def release_lease(home: Path, flow_run_id: str, store: ModelStore) -> Iterator[ReleaseLease]:
    """Hold the lease of this release run for the block; it is removed on any normal exit."""
    folder = lease_dir(home)
    folder.mkdir(parents=True, exist_ok=True)
    lease = ReleaseLease(
        flow_run_id=flow_run_id,
        pid=os.getpid(),
        process_started=psutil.Process().create_time(),
        store=store,
    )
    path = folder / f"{flow_run_id}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(lease.model_dump_json())
    tmp.replace(path)
    try:
        yield lease
    finally:
        path.unlink(missing_ok=True)


@task(retries=1, retry_delay_seconds=2)
def settle_killed_releases(home: Path, store: ModelStore) -> list[SettledRelease]:
    """End the MLflow runs and the Prefect flow runs of releases whose process died: this
    host's (by their leases), and any host's that Prefect already holds final.

    Args:
        home: SLMOPS_HOME, where this host's leases are.
        store: the store whose orphaned runs are settled.
    """
    settled = _settle_dead_leases(home)
    return settled + settle_orphaned_runs(store)


def _settle_dead_leases(home: Path) -> list[SettledRelease]:
    settled = []
    for path in sorted(lease_dir(home).glob("*.json")):
        try:
            lease = ReleaseLease.model_validate_json(path.read_text())
        except (OSError, ValueError):
            continue  # being written, or not ours: leave it
        if lease.process_alive():
            continue
        message = (
            f"release process {lease.pid} ended without finishing (killed); "
            "settled by a later slmops run"
        )
        killed = kill_runs_of(lease.store, lease.flow_run_id, message)
        state = crash_flow_run(lease.flow_run_id, message)
        path.unlink(missing_ok=True)
        settled.append(
            SettledRelease(
                flow_run_id=lease.flow_run_id, killed_runs=tuple(killed), flow_run_state=state
            )
        )
        _log.warning(
            "Settled killed release %s: MLflow runs %s ended KILLED, flow run %s",
            lease.flow_run_id, killed or "none", state or "already final",
        )  # fmt: skip
    return settled


def settle_orphaned_runs(store: ModelStore) -> list[SettledRelease]:
    """End the runs left `pending` by release flow runs that Prefect holds final.

    A run of a flow run Prefect cannot find (another Prefect server, deleted) or still holds
    running is left alone.
    """
    client = store.client()
    pending = f"attributes.status = 'RUNNING' and tags.`{tags.CANDIDATE}` = 'pending'"
    try:
        experiments = [e.experiment_id for e in client.search_experiments()]
        runs = client.search_runs(experiments, filter_string=pending) if experiments else []
    except MlflowException:
        return []
    settled = []
    for flow_run_id in sorted({run.data.tags.get(tags.FLOW_RUN, "") for run in runs} - {""}):
        state = final_state_of(flow_run_id)
        if state is None:
            continue
        message = (
            f"release flow run {flow_run_id} ended {state} with its runs unfinished (its host "
            "or process died); settled by a later slmops run"
        )
        killed = kill_runs_of(store, flow_run_id, message)
        settled.append(
            SettledRelease(flow_run_id=flow_run_id, killed_runs=tuple(killed), flow_run_state=None)
        )
        _log.warning(
            "Settled release %s, %s in Prefect: MLflow runs %s ended KILLED",
            flow_run_id, state, killed or "none",
        )  # fmt: skip
    return settled


def final_state_of(flow_run_id: str) -> str | None:
    """The name of the Prefect flow run's state if it is final; None if it is not, or if
    Prefect cannot say (another server, a deleted run, the API down)."""
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(flow_run_id).state  # type: ignore[arg-type]
    except Exception as error:
        _log.debug("no final state for flow run %s: %s", flow_run_id, error)
        return None
    return state.name if state is not None and state.is_final() else None


ZOMBIE_AUTOMATION = "slmops: crash flow runs that stopped heartbeating"


def ensure_zombie_automation(within_s: int = 120) -> str:
    """Create (once) the Prefect automation that sets a flow run Crashed when its heartbeats
    stop for `within_s`: how a run on a host that died becomes final for the other hosts.
    Flow runs send heartbeats every `PREFECT_FLOWS_HEARTBEAT_FREQUENCY` seconds (Prefect's
    default 180, at least 30; the scale-out job templates set 30): `within_s` must exceed it.
    Returns the automation's id."""
    from datetime import timedelta

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

    ended = ("Completed", "Failed", "Cancelled", "Crashed")
    automation = AutomationCore(
        name=ZOMBIE_AUTOMATION,
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *(f"prefect.flow-run.{s}" for s in ended)},
            match={"prefect.resource.id": ["prefect.flow-run.*"]},
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=within_s),
        ),
        actions=[
            ChangeFlowRunState(
                name="Crashed",
                state=StateType.CRASHED,
                message=f"no heartbeat for {within_s} s: its process or host died",
                force=True,  # a Running flow run may not go to Crashed without it
            )
        ],
    )
    with get_client(sync_client=True) as client:
        existing = client.read_automations_by_name(ZOMBIE_AUTOMATION)
        if existing:
            return str(existing[0].id)
        return str(client.create_automation(automation))


def kill_runs_of(store: ModelStore, flow_run_id: str, message: str) -> list[str]:
    """End the unfinished MLflow runs of `flow_run_id` KILLED and non-candidate; their
    LoggedModels (half-logged, never registered) are deleted. Returns the run ids."""
    client = store.client()
    try:
        experiments = [e.experiment_id for e in client.search_experiments()]
        runs = client.search_runs(
            experiments, filter_string=f"tags.`{tags.FLOW_RUN}` = '{flow_run_id}'"
        )
    except MlflowException:
        return []  # the store is gone or moved: nothing there to settle
    killed = []
    for run in runs:
        if run.info.status != RunStatus.to_string(RunStatus.RUNNING):
            continue
        run_id = run.info.run_id
        if run.data.tags.get(tags.CANDIDATE) == "pending":
            client.set_tag(run_id, tags.CANDIDATE, "false")
            client.set_tag(run_id, tags.FAILURE, message)
            for model in client.search_logged_models(
                experiment_ids=[run.info.experiment_id],
                filter_string=f"source_run_id = '{run_id}'",
            ):
                client.delete_logged_model(model.model_id)
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.KILLED))
        killed.append(run_id)
    return killed


def crash_flow_run(flow_run_id: str, message: str) -> str | None:
    """Set the Prefect flow run Crashed unless it is already final; the state set, or None."""
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    try:
        with get_client(sync_client=True) as client:
            flow_run = client.read_flow_run(flow_run_id)  # type: ignore[arg-type]
            if flow_run.state is not None and flow_run.state.is_final():
                return None
            client.set_flow_run_state(flow_run_id, Crashed(message=message), force=True)  # type: ignore[arg-type]
            return "Crashed"
    except Exception as error:  # another Prefect API, or the run was deleted
        _log.warning("could not settle Prefect flow run %s: %s", flow_run_id, error)
        return None
