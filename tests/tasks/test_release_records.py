"""The clean-up of killed releases through the shared services: MLflow runs left `pending` by a
flow run that Prefect holds final are settled from any host; the automation that makes a flow
run whose host died final. (The per-host lease path is covered end to end in
tests/flows/test_reliability.py.)"""

from __future__ import annotations

import uuid

import pytest
from mlflow.entities import RunStatus
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import StateType
from prefect.states import Crashed, Running

from slmops import tags
from slmops.store import ModelStore
from tasks.release_records import (
    ZOMBIE_AUTOMATION,
    ensure_zombie_automation,
    final_state_of,
    settle_orphaned_runs,
)

pytestmark = pytest.mark.integration


@flow(name="a-release-somewhere")
def a_release() -> None:
    """Never run: flow runs of it are created through the API, as workers' would be."""


def new_flow_run() -> str:
    with get_client(sync_client=True) as client:
        return str(client.create_flow_run(a_release, state=Running()).id)


def pending_run(store: ModelStore, flow_run_id: str) -> str:
    client = store.client()
    experiment = client.get_experiment_by_name("records") or None
    exp_id = experiment.experiment_id if experiment else client.create_experiment("records")
    run = client.create_run(exp_id, tags={tags.CANDIDATE: "pending", tags.FLOW_RUN: flow_run_id})
    return run.info.run_id


def test_runs_of_a_flow_run_prefect_holds_crashed_are_settled_and_no_others(
    prefect_harness, fresh_store: ModelStore
):
    crashed, running = new_flow_run(), new_flow_run()
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(crashed, Crashed(message="host died"), force=True)  # type: ignore[arg-type]
    unknown = str(uuid.uuid4())  # a flow run of another Prefect server
    runs = {fr: pending_run(fresh_store, fr) for fr in (crashed, running, unknown)}
    assert final_state_of(crashed) == "Crashed" and final_state_of(running) is None

    settled = settle_orphaned_runs(fresh_store)

    assert [(s.flow_run_id, s.killed_runs) for s in settled] == [(crashed, (runs[crashed],))]
    client = fresh_store.client()
    dead = client.get_run(runs[crashed])
    assert dead.info.status == RunStatus.to_string(RunStatus.KILLED)
    assert dead.data.tags[tags.CANDIDATE] == "false"
    assert "ended Crashed" in dead.data.tags[tags.FAILURE]
    for alive in (running, unknown):
        run = client.get_run(runs[alive])
        assert run.info.status == "RUNNING" and run.data.tags[tags.CANDIDATE] == "pending"
    assert settle_orphaned_runs(fresh_store) == []  # settled once


def test_the_zombie_automation_is_created_once_and_crashes_on_missing_heartbeats(
    prefect_harness,
):
    first = ensure_zombie_automation(within_s=60)
    assert ensure_zombie_automation(within_s=60) == first
    with get_client(sync_client=True) as client:
        (automation,) = client.read_automations_by_name(ZOMBIE_AUTOMATION)
    trigger = automation.trigger
    assert trigger.posture == "Proactive" and trigger.within.total_seconds() == 60
    assert trigger.after == {"prefect.flow-run.heartbeat"}
    assert "prefect.flow-run.Completed" in trigger.expect
    (action,) = automation.actions
    assert action.state == StateType.CRASHED and action.force
