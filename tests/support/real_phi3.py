"""A real Phi-3-mini release's registry entries, in a store of its own process.

`python -m tests.support.real_phi3 register <tracking-uri> <artifacts-folder>` registers a
Production release of the real model, as the hub flow would have (the registry entries only);
`... inspect <tracking-uri> [logged-model-id ...]` prints the real model's registry state and
which of the logged models exist. Both print JSON. test_first_run uses them in a subprocess:
its own process has the store's old database open through MLflow's per-URI store cache, and
that database is the one the test deletes.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

from mlflow.exceptions import MlflowException

from slmops.config import PHI3_REPO_ID, WrapperKind
from slmops.promotion import CHAMPION
from slmops.store import ModelStore
from tasks.registry import SOURCE_REPO_TAG, read_state

REAL_NAMES = [f"phi3-mini-{kind.value}" for kind in WrapperKind]


def register(store: ModelStore, artifacts: Path) -> None:
    client = store.client()
    for name in REAL_NAMES:
        client.create_registered_model(name, tags={SOURCE_REPO_TAG: PHI3_REPO_ID})
        version = client.create_model_version(
            name, source=str(artifacts / name), tags={SOURCE_REPO_TAG: PHI3_REPO_ID}
        )
        client.transition_model_version_stage(name, version.version, "Production")
        client.set_registered_model_alias(name, CHAMPION, version.version)


def inspect(store: ModelStore, model_ids: list[str]) -> dict[str, object]:
    client = store.client()
    existing = []
    for model_id in model_ids:
        with contextlib.suppress(MlflowException):
            existing.append(client.get_logged_model(model_id).model_id)
    return {
        "real": {name: read_state(client, name).model_dump(mode="json") for name in REAL_NAMES},
        "logged_models_found": existing,
    }


def main(argv: list[str]) -> None:
    command, tracking_uri, *rest = argv
    store = ModelStore(tracking_uri=tracking_uri)
    if command == "register":
        register(store, Path(rest[0]))
        print(json.dumps(inspect(store, [])))
    else:
        print(json.dumps(inspect(store, rest)))


if __name__ == "__main__":
    main(sys.argv[1:])
