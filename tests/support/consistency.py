"""Checks that a registry and the model servers of one store are in a consistent state."""

from __future__ import annotations

import psutil

from slmops.promotion import CHALLENGER, CHAMPION
from slmops.store import ModelStore
from tasks.registry import SOURCE_MODEL_TAG, read_state


def assert_consistent(store: ModelStore, name: str) -> None:
    """One Production version, @champion on it, nothing left half-promoted, no duplicates."""
    client = store.client()
    state = read_state(client, name)
    production = [v for v, stage in state.stages.items() if stage == "Production"]
    assert len(production) == 1, state
    assert state.aliases.get(CHAMPION) == production[0], state
    assert "Staging" not in state.stages.values() and CHALLENGER not in state.aliases, state
    assert set(state.stages) == set(range(1, len(state.stages) + 1)), state  # none lost
    sources = [v.tags[SOURCE_MODEL_TAG] for v in client.search_model_versions(f"name='{name}'")]
    assert len(sources) == len(set(sources)), f"a logged model registered twice: {sources}"


def servers_of_store(store: ModelStore, name: str | None = None) -> list[psutil.Process]:
    """Every `mlflow models serve` process serving from this store (each test has its own
    store), or only those serving a version of the registered model `name`."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "models serve" not in cmdline:
            continue
        if name is not None and f"models:/{name}/" not in cmdline:
            continue
        try:
            if proc.environ().get("MLFLOW_TRACKING_URI") == store.tracking_uri:
                found.append(proc)
        except (psutil.AccessDenied, psutil.NoSuchProcess):
            continue
    return found
