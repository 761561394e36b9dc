"""The store object: which store it names, the clients it hands out, and how it keys caches."""

from __future__ import annotations

import mlflow
import pytest
from prefect.utilities.hashing import hash_objects
from pydantic import ValidationError

from slmops.config import Settings
from slmops.store import ModelStore

pytestmark = pytest.mark.unit


def test_the_registry_is_the_tracking_stores_own_unless_named(tmp_path):
    tracking = f"sqlite:///{tmp_path}/m.db"
    assert ModelStore(tracking_uri=tracking).registry_uri == tracking
    assert ModelStore(tracking_uri=tracking, registry_uri="").registry_uri == tracking
    other = ModelStore(tracking_uri=tracking, registry_uri="sqlite:////elsewhere/r.db")
    assert other.registry_uri == "sqlite:////elsewhere/r.db"


def test_a_store_is_frozen_and_rejects_unknown_fields(tmp_path):
    store = ModelStore(tracking_uri=f"sqlite:///{tmp_path}/m.db")
    with pytest.raises(ValidationError):
        store.tracking_uri = "sqlite:////other.db"  # type: ignore[misc]
    with pytest.raises(ValidationError):
        ModelStore(tracking_uri=store.tracking_uri, artifacts="s3://x")  # type: ignore[call-arg]


def test_clients_talk_to_the_store_and_its_registry(tmp_path):
    store = ModelStore(
        tracking_uri=f"sqlite:///{tmp_path}/t.db", registry_uri=f"sqlite:///{tmp_path}/r.db"
    )
    client = store.client()
    assert client.tracking_uri == store.tracking_uri
    assert client._registry_uri == store.registry_uri


def test_from_settings_is_the_store_the_settings_name(tmp_path):
    home = Settings.from_env({"SLMOPS_HOME": str(tmp_path)})
    assert ModelStore.from_settings(home).tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    remote = Settings.from_env({"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"})
    assert ModelStore.from_settings(remote).tracking_uri == "http://127.0.0.1:5000"


def test_sqlite_artifacts_go_beside_the_database(tmp_path):
    store = ModelStore(tracking_uri=f"sqlite:///{tmp_path}/m.db")
    assert store.database == tmp_path / "m.db"
    assert store.artifact_location == (tmp_path / "mlartifacts").as_uri()
    remote = ModelStore(tracking_uri="http://127.0.0.1:5000")
    assert remote.database is None and remote.artifact_location is None


def test_activated_points_the_fluent_api_at_the_store_and_restores_it(tmp_path):
    before = mlflow.get_tracking_uri()
    with ModelStore(tracking_uri=f"sqlite:///{tmp_path}/x.db").activated():
        assert mlflow.get_tracking_uri().endswith("x.db")
    assert mlflow.get_tracking_uri() == before


def test_a_child_process_is_pointed_at_both_uris(tmp_path):
    store = ModelStore(tracking_uri=f"sqlite:///{tmp_path}/m.db")
    assert store.environment() == {
        "MLFLOW_TRACKING_URI": store.tracking_uri,
        "MLFLOW_REGISTRY_URI": store.tracking_uri,
    }


def test_cache_keys_are_keyed_on_the_store(tmp_path):
    # What Prefect's INPUTS policy hashes: equal stores give one key, other stores another.
    a = f"sqlite:///{tmp_path}/a.db"
    key = hash_objects({"store": ModelStore(tracking_uri=a)}, raise_on_failure=True)
    same = ModelStore(tracking_uri=a, registry_uri=a)
    assert hash_objects({"store": same}, raise_on_failure=True) == key
    for other in (
        ModelStore(tracking_uri=f"sqlite:///{tmp_path}/b.db"),
        ModelStore(tracking_uri=a, registry_uri=f"sqlite:///{tmp_path}/r.db"),
    ):
        assert hash_objects({"store": other}, raise_on_failure=True) != key
