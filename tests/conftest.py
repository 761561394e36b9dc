"""Shared test setup: isolated Prefect/MLflow state, the embedded model built once per machine."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from subprocess import Popen
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from slmops.store import ModelStore
    from tests.support.release_home import ReleaseHome

# Before anything imports prefect or mlflow: keep their state out of ~ and stay quiet offline.
_SESSION_DIR = Path(tempfile.mkdtemp(prefix="slmops-tests-"))
os.environ["PREFECT_HOME"] = str(_SESSION_DIR / "prefect")
os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = str(_SESSION_DIR / "prefect" / "results")
os.environ["DO_NOT_TRACK"] = "true"
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_LOGGING_TO_API_ENABLED"] = "false"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["MLFLOW_ENABLE_ASYNC_LOGGING"] = "false"
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("HF_TOKEN", None)

import pytest  # noqa: E402

from tests.support.checkout import state_in  # noqa: E402

CHECKOUT = Path(__file__).resolve().parents[1]

# The tiny model takes ~20 s to build; it is deterministic, so one build per machine serves all
# test sessions (CI's fresh clone builds it once).
EMBEDDED_CACHE = Path(os.environ.get("SLMOPS_TEST_CACHE", Path.home() / ".cache" / "slmops-tests"))
os.environ["SLMOPS_EMBEDDED_CACHE"] = str(EMBEDDED_CACHE)  # flows under test build it there too


@pytest.fixture(scope="session", autouse=True)
def checkout_stays_clean() -> Iterator[None]:
    """Fails the session (an error at the last teardown) if it left MLflow or slmops state in
    the checkout: tests write under tmp only. State that was there before is not the tests'."""
    before = state_in(CHECKOUT)
    yield
    gained = sorted(str(path) for path in state_in(CHECKOUT) - before)
    assert not gained, f"the tests wrote into the checkout: {gained}"


@pytest.fixture(scope="session")
def embedded_repos() -> dict[str, Path]:
    """repo id -> local folder of the embedded tiny Phi-3 and its ONNX release."""
    from filelock import FileLock

    from offline_kit.embedded import ensure_embedded_repos

    EMBEDDED_CACHE.mkdir(parents=True, exist_ok=True)
    with FileLock(EMBEDDED_CACHE / ".build.lock"):  # parallel workers: one builds, the rest wait
        return ensure_embedded_repos(EMBEDDED_CACHE)


@pytest.fixture(scope="session")
def tiny_model_dir(embedded_repos: dict[str, Path]) -> Path:
    from slmops.config import TINY_PHI3_REPO_ID

    return embedded_repos[TINY_PHI3_REPO_ID]


@pytest.fixture(scope="session")
def tiny_onnx_int4_dir(embedded_repos: dict[str, Path]) -> Path:
    from slmops.config import PHI3_ONNX_INT4_SUBFOLDER, TINY_PHI3_ONNX_REPO_ID

    return embedded_repos[TINY_PHI3_ONNX_REPO_ID] / PHI3_ONNX_INT4_SUBFOLDER


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory) -> Path:
    """An empty MLflow SQLite database, created once: MLflow's schema migrations take ~5 s per
    new database here, so each test's store starts as a copy of this one."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    database = tmp_path_factory.mktemp("empty-store") / "mlflow.db"
    # The Default experiment's artifact root is fixed here: under tmp, not ./mlruns.
    SqlAlchemyStore(f"sqlite:///{database}", (database.parent / "mlruns").as_uri())
    return database


def new_store(folder: Path, empty_store: Path) -> ModelStore:
    """A new, empty MLflow SQLite store in `folder`."""
    from slmops.store import ModelStore

    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(empty_store, folder / "mlflow.db")
    return ModelStore(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}")


@pytest.fixture(scope="session")
def store(tmp_path_factory, empty_store) -> ModelStore:
    """One MLflow SQLite store for the tests that read the `logged` wrappers (and add their own)."""
    return new_store(tmp_path_factory.mktemp("mlflow"), empty_store)


@pytest.fixture(scope="session")
def logged(store, tiny_model_dir, tiny_onnx_int4_dir):
    """The three wrappers of the embedded model, logged once per session into `store`."""
    from slmops.config import GenerationSpec, OnnxExportSpec
    from tasks.mlflow_models import log_chat_pipeline, log_onnx_chat_model, log_onnx_prompt_model

    generation, export = GenerationSpec(max_new_tokens=32), OnnxExportSpec()
    source = {"repo": "slmops/tiny-phi3", "commit": "0123abcd"}
    refs = [
        log_chat_pipeline.fn(store, "release", tiny_model_dir, generation, source),
        log_onnx_prompt_model.fn(store, "release", tiny_onnx_int4_dir, generation, export, source),
        log_onnx_chat_model.fn(store, "release", tiny_onnx_int4_dir, generation, export, source),
    ]
    return {ref.kind: ref for ref in refs}


@pytest.fixture()
def fresh_store(tmp_path: Path, empty_store: Path) -> ModelStore:
    """A fresh MLflow tracking + registry store on SQLite for one test."""
    return new_store(tmp_path, empty_store)


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server for the session (flows and tasks called directly)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


# The session's release is README command 1 on a new user's machine (empty HOME, a temporary
# Prefect server of its own): `python -m flows.release deployments/local.yaml`.
FIRST_RUN_ARGUMENT = "deployments/local.yaml"


def _uses_shared_release(item: pytest.Item) -> bool:
    return "released" in getattr(item, "fixturenames", ())


def _in_parallel(config: pytest.Config) -> bool:
    """Whether pytest-xdist runs this session on several workers (addopts: `-n auto`)."""
    return bool(getattr(config.option, "numprocesses", None)) or "PYTEST_XDIST_WORKER" in (
        os.environ
    )


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Each module runs whole on one worker (its module-scoped homes and ordered chains), and
    # every test on the shared release runs on the same worker: one shared release a session.
    if "PYTEST_XDIST_WORKER" in os.environ:
        from _pytest.nodeid import coerce_node_id

        for item in items:
            group = "shared-release" if _uses_shared_release(item) else item.nodeid.split("::")[0]
            # `--dist loadgroup` groups by a "@group" suffix of the test's id. pytest-xdist 3.8
            # writes it to `item._nodeid` (from an `xdist_group` mark), which pytest 9 no longer
            # reads (the id is `item._id`), so every test would go its own way: write it here.
            item._id = coerce_node_id(f"{item.nodeid}@{group}")
    # In parallel the shared release's tests come first, so that one worker starts with them
    # (the longest group) while the others take the rest. Run serially, the release starts in
    # the background with the first test (`release_started`) and its tests run last, when it is
    # ready. Either way the test that deletes its state folder runs after all its others.
    parallel = _in_parallel(config)
    items.sort(
        key=lambda item: (
            _uses_shared_release(item) != parallel,
            item.get_closest_marker("deletes_shared_release") is not None,
        )
    )


@contextlib.contextmanager
def _shared_release(request, tmp_path_factory) -> Iterator[tuple[ReleaseHome, Popen]]:
    """Start the shared release's process; at the end, stop every server it started."""
    import yaml
    from prefect.settings import PREFECT_API_URL

    from slmops.config import ReleaseConfig, Settings, WrapperKind
    from slmops.servers import FRONT_DOOR
    from tasks.serving import served_names, stop_server
    from tests.support.consistency import servers_of_store
    from tests.support.release_home import REPO_ROOT, ReleaseHome, release_env

    request.getfixturevalue("prefect_harness")
    request.getfixturevalue("embedded_repos")
    root = tmp_path_factory.mktemp("release-home")
    outputs = tmp_path_factory.mktemp("release-outputs")
    config = ReleaseConfig.model_validate(
        yaml.safe_load((REPO_ROOT / FIRST_RUN_ARGUMENT).read_text())["config"]
    )
    home = ReleaseHome(
        settings=Settings.from_env({"SLMOPS_HOME": str(root)}),
        env=release_env(root, str(PREFECT_API_URL.value())),
        outputs=outputs,
        names={kind: config.registry.model_name(kind) for kind in WrapperKind},
        machine_home=tmp_path_factory.mktemp("machine-home"),
    )
    proc = home.start("first", FIRST_RUN_ARGUMENT, env=home.new_machine_env())
    try:
        yield home, proc
    finally:
        if proc.poll() is None:  # the session ended before a test needed it
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        servers = home.settings.servers_dir
        stops = []
        if servers.is_dir():  # test_first_run deletes the whole state folder, last
            with ThreadPoolExecutor() as pool:  # each waits for its process group to exit
                stops = [pool.submit(stop_server, servers, FRONT_DOOR)]
                stops += [pool.submit(stop_server, servers, n) for n in served_names(servers)]
        for orphan in servers_of_store(home.store):
            os.killpg(orphan.pid, signal.SIGKILL)
        for stop in stops:
            stop.result()


@pytest.fixture(scope="session", autouse=True)
def release_started(request, tmp_path_factory) -> Iterator[tuple[ReleaseHome, Popen] | None]:
    """Run serially, the shared release's process, started in the background with the session's
    first test when a selected test uses `released` (else None). On a pytest-xdist worker it is
    None: a worker cannot know yet whether it will get the shared release's tests, so
    `released` starts it when the first of them runs (first on its worker)."""
    if _in_parallel(request.config) or not any(
        _uses_shared_release(item) for item in request.session.items
    ):
        yield None
        return
    with _shared_release(request, tmp_path_factory) as started:
        yield started


@pytest.fixture(scope="session")
def released(
    request, tmp_path_factory, release_started: tuple[ReleaseHome, Popen] | None
) -> Iterator[ReleaseHome]:
    """One real release for the session, run as a new user runs it (README command 1 with an
    empty HOME, HF_TOKEN set; test_first_run checks its output): the three wrappers validated,
    registered, promoted and served by `mlflow models serve`, the front door in front of them.

    The bad-request, front-door and reliability tests share it. A test that changes what is
    served (kills a server, switches a version, releases again) puts the champions back
    (`ReleaseHome.restore_serving`) or restores what it changed, so any order of tests works.
    """
    with contextlib.ExitStack() as stack:
        home, proc = release_started or stack.enter_context(
            _shared_release(request, tmp_path_factory)
        )
        report = home.finish("first", proc)
        assert {o["registered_model"] for o in report["outcomes"]} == set(home.names.values())
        assert all(o["promoted"] for o in report["outcomes"]), report
        yield home


@pytest.fixture()
def restores_serving(released):
    """For a test that changes what `released` serves: afterwards, passed or failed, every
    champion is served again, with the front door (healthy servers are kept)."""
    yield released
    released.restore_serving()


@pytest.fixture()
def fake_hub(embedded_repos: dict[str, Path]):
    """A loopback fake Hugging Face hub serving the embedded repos, fresh (no faults) per test."""
    from offline_kit.fake_hub import FakeHub

    with FakeHub(embedded_repos) as hub:
        yield hub


@pytest.fixture()
def captured_logs() -> Iterator[list[str]]:
    """Everything logged in this process during the test (huggingface_hub at DEBUG), formatted."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    handler = Collect(level=logging.DEBUG)
    names = ("", "prefect", "prefect.task_runs", "prefect.flow_runs", "huggingface_hub", "tasks")
    loggers = [logging.getLogger(name) for name in names]
    hub_logger = logging.getLogger("huggingface_hub")
    hub_level = hub_logger.level
    hub_logger.setLevel(logging.DEBUG)
    for logger in loggers:
        logger.addHandler(handler)
    yield lines
    for logger in loggers:
        logger.removeHandler(handler)
    hub_logger.setLevel(hub_level)
