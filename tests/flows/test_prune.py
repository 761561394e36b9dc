"""The prune flow: on echo versions (real MLflow on SQLite, real Prefect), and the stored bytes
of three tiny-model releases before and after a prune."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import pytest
from mlflow.entities import RunStatus
from mlflow.models import infer_signature
from prefect.logging import disable_run_logger

from flows.prune import load_config, prune
from flows.rollback import rollback
from slmops import tags
from slmops.config import (
    OnnxExportSpec,
    PruneConfig,
    RegistrySpec,
    RollbackConfig,
    ServeSpec,
    Settings,
    WrapperKind,
)
from slmops.refs import ModelVersionRef, SnapshotRef
from slmops.store import ModelStore
from tasks.caching import logged_model_exists
from tasks.mlflow_models import experiment_id
from tasks.onnx_storage import ARTIFACT_PATH, STORE_RUN_NAME, store_onnx_folder
from tasks.registry import (
    PrunedVersionError,
    audit_trail,
    promote_version,
    read_state,
    register_version,
)
from tasks.retention import stored_versions
from tests.support.echo_versions import ECHO_MODEL

PREFIX = "keep"
ONNX_KINDS = (WrapperKind.PROMPT_ONNX, WrapperKind.CHAT_ONNX)
PROMPT, CHAT = (RegistrySpec(name_prefix=PREFIX).model_name(k) for k in ONNX_KINDS)


@pytest.mark.unit
def test_config_from_the_command_line_and_its_limits(tmp_path):
    assert load_config(None) == PruneConfig() and PruneConfig().keep_last == 2
    path = tmp_path / "prune.yaml"
    path.write_text("config: {keep_last: 3, registry: {name_prefix: phi3-mini}}\n")
    assert load_config(str(path), dry_run=True) == PruneConfig(
        keep_last=3, registry=RegistrySpec(name_prefix="phi3-mini"), dry_run=True
    )
    assert load_config('{"keep_last": 1}').keep_last == 1
    with pytest.raises(ValueError, match="keep_last"):
        PruneConfig(keep_last=0)


def _store_fake_onnx(store: ModelStore, folder: Path, label: str) -> str:
    """A `store-onnx` run holding a small folder, as tasks/onnx_storage.py stores one."""
    client = store.client()
    src = folder / label
    src.mkdir(parents=True)
    (src / "genai_config.json").write_text("{}")
    (src / "model.onnx.data").write_bytes(b"\0" * 100_000)
    run = client.create_run(experiment_id(store, "echo"), run_name=STORE_RUN_NAME)
    client.log_artifacts(run.info.run_id, str(src), ARTIFACT_PATH)
    client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.FINISHED))
    return f"{client.get_run(run.info.run_id).info.artifact_uri}/{ARTIFACT_PATH}"


def _release_echo(store: ModelStore, onnx_uri: str, locks: Path) -> None:
    """One release's two ONNX wrappers: echo models naming `onnx_uri`, registered, promoted."""
    for name in (PROMPT, CHAT):
        with store.activated(), mlflow.start_run(experiment_id=experiment_id(store, "echo")):
            mlflow.log_param(tags.ONNX_ARTIFACT_URI_PARAM, onnx_uri)
            info = mlflow.pyfunc.log_model(
                name="echo",
                python_model=str(ECHO_MODEL),
                signature=infer_signature({"prompt": "hi"}, ["echo: hi"]),
                pip_requirements=["mlflow"],
            )
        with disable_run_logger():
            ref = register_version.fn(
                store, info.model_uri, name, {tags.VALIDATION_PASSED: "true"}, locks
            )
            promote_version.fn(store, ref, "release", locks)


def _files(uri: str) -> Path:
    return Path(uri.removeprefix("file://"))


def fresh_home(tmp_path, empty_store, monkeypatch) -> tuple[Settings, ModelStore]:
    """A new SLMOPS_HOME with an empty store, that the flows called here use."""
    home = tmp_path / "home"
    home.mkdir()
    shutil.copyfile(empty_store, home / "mlflow.db")
    point_at(home, monkeypatch)
    settings = Settings.from_env()
    return settings, ModelStore.from_settings(settings)


@pytest.mark.integration
def test_prune_flow_on_echo_releases(tmp_path, empty_store, prefect_harness, monkeypatch):
    settings, store = fresh_home(tmp_path, empty_store, monkeypatch)
    client = store.client()
    # Four releases: folder a (v1), folder b shared by v2 and v3 (a re-release with new
    # generation settings of the same build), folder d (v4, Production).
    onnx = {label: _store_fake_onnx(store, tmp_path / "src", label) for label in "abd"}
    for label in "abbd":
        _release_echo(store, onnx[label], settings.lock_dir)
    client.set_registered_model_alias(CHAT, "golden", "1")
    states = {name: read_state(client, name) for name in (PROMPT, CHAT)}
    assert states[PROMPT].stages == {1: "Archived", 2: "Archived", 3: "Archived", 4: "Production"}
    files = {(v.name, v.version): _files(v.artifact_uri) for v in stored_versions(client)}
    config = PruneConfig(registry=RegistrySpec(name_prefix=PREFIX), kinds=ONNX_KINDS)

    dry = prune(config.model_copy(update={"dry_run": True}))
    assert [(v.name, v.version) for v in dry.pruned] == [(CHAT, 2), (PROMPT, 2), (PROMPT, 1)]
    assert {v.action for v in dry.pruned} == {"would prune"} and dry.freed_bytes == 0
    assert all(path.is_dir() for path in files.values())
    assert not any(tags.PRUNED in v.tags for v in client.search_model_versions(f"name='{PROMPT}'"))

    report = prune(config)
    gone = {(CHAT, 2), (PROMPT, 2), (PROMPT, 1)}
    assert {(v.name, v.version) for v in report.pruned} == gone
    assert report.freed_bytes > 0
    for key, path in files.items():
        assert path.is_dir() == (key not in gone), key
    # Folder a: the aliased chat v1 uses it; b: both v3; d: the champions.
    assert all((_files(uri) / "genai_config.json").is_file() for uri in onnx.values())
    assert {name: read_state(client, name) for name in (PROMPT, CHAT)} == states
    for name, n in gone:
        found = client.get_model_version(name, str(n))
        assert json.loads(found.tags[tags.PRUNED])["reason"] == config.reason
        assert not logged_model_exists(store, found.source.removeprefix("models:/"))
    moves = [e for e in audit_trail(store, PROMPT) if "pruned" in e.move]
    assert sorted(e.version for e in moves) == [1, 2]
    assert all(e.by and e.reason.startswith(config.reason) for e in moves)

    # A pruned version is no rollback or promotion target, and the registry stays as it was.
    with pytest.raises(
        PrunedVersionError, match=r"pruned on .*: v4 \(Production\), v3 \(Archived\)$"
    ):
        rollback(
            RollbackConfig(
                kind=WrapperKind.PROMPT_ONNX,
                version=2,
                reason="back to v2",
                registry=RegistrySpec(name_prefix=PREFIX),
                serve=ServeSpec(enabled=False),
            )  # fmt: skip
        )
    with disable_run_logger(), pytest.raises(PrunedVersionError, match="cannot promote"):
        promote_version.fn(store, ModelVersionRef(name=PROMPT, version=1), "x", settings.lock_dir)
    assert read_state(client, PROMPT) == states[PROMPT]

    # Without its alias, chat v1 goes too, and with it folder a (no kept version names it).
    client.delete_registered_model_alias(CHAT, "golden")
    again = prune(config)
    assert [(v.name, v.version) for v in again.pruned] == [(CHAT, 1)]
    assert again.pruned[0].deleted == (str(files[(CHAT, 1)].as_uri()), onnx["a"])
    assert not _files(onnx["a"]).exists() and (_files(onnx["b"]) / "genai_config.json").is_file()
    assert prune(config).pruned == ()  # nothing left to prune


def point_at(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Flows called here use the store in `home` (an earlier test's MLflow URI must not leak)."""
    monkeypatch.setenv("SLMOPS_HOME", str(home))
    for variable in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(variable, raising=False)


def _artifact_bytes(settings: Settings) -> int:
    root = settings.home / "mlartifacts"
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


@pytest.mark.integration
def test_three_tiny_releases_pruned_to_two_releases_worth(
    tmp_path, empty_store, prefect_harness, monkeypatch, tiny_model_dir, tiny_onnx_int4_dir
):
    """Three releases of three commits of the tiny model, logged by the release flow's own
    logging (each with its own stored ONNX folder), registered and promoted; the prune flow
    with its defaults then leaves at most two releases' bytes under the artifact root."""
    from flows.release import EXPERIMENT, ReleaseConfig, log_wrappers

    settings, store = fresh_home(tmp_path, empty_store, monkeypatch)
    config = ReleaseConfig()
    sizes = []
    for n in range(3):
        snapshot = SnapshotRef(
            repo_id=config.hub.repo_id, revision="main", commit=f"{n + 1}" * 40,
            path=tiny_model_dir, files=(),
        )  # fmt: skip
        logged = log_wrappers(config, settings, snapshot, tiny_onnx_int4_dir)
        for kind, ref in logged.items():
            with disable_run_logger():
                version = register_version.fn(
                    store, ref.model_uri, config.registry.model_name(kind),
                    tags.version_tags(snapshot.repo_id, snapshot.commit, "", True, "ok"),
                    settings.lock_dir,
                )  # fmt: skip
                promote_version.fn(store, version, "release", settings.lock_dir)
        sizes.append(_artifact_bytes(settings))
    one_release = sizes[0]
    assert sizes[2] > 2.9 * one_release  # three full copies: weights, ONNX folder, wrappers

    report = prune(PruneConfig())
    after = _artifact_bytes(settings)
    print(f"artifact root: 1 release {one_release} B, 3 releases {sizes[2]} B, pruned {after} B")
    assert {(v.name, v.version) for v in report.pruned} == {
        (config.registry.model_name(kind), 1) for kind in WrapperKind
    }
    assert after <= 2 * one_release
    assert sizes[2] - after == pytest.approx(report.freed_bytes, rel=0.01)
    # A re-release of the pruned commit stores its ONNX folder anew instead of naming the
    # deleted one (and its logged models are gone, so the logging cache misses too).
    source = {"repo_id": config.hub.repo_id, "commit": "1" * 40}
    with disable_run_logger():
        stored = store_onnx_folder.fn(
            store, EXPERIMENT, tiny_onnx_int4_dir, OnnxExportSpec(), source
        )
    assert not stored.reused and (_files(stored.artifact_uri) / "genai_config.json").is_file()
