"""Shared test setup: isolated Prefect/MLflow state, the embedded model built once per machine."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

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

# The tiny model takes ~20 s to build; it is deterministic, so one build per machine serves all
# test sessions (CI's fresh clone builds it once).
EMBEDDED_CACHE = Path(os.environ.get("SLMOPS_TEST_CACHE", Path.home() / ".cache" / "slmops-tests"))
os.environ["SLMOPS_EMBEDDED_CACHE"] = str(EMBEDDED_CACHE)  # flows under test build it there too


@pytest.fixture(scope="session")
def embedded_repos() -> dict[str, Path]:
    """repo id -> local folder of the embedded tiny Phi-3 and its ONNX release."""
    from slmops.embedded import ensure_embedded_repos

    return ensure_embedded_repos(EMBEDDED_CACHE)


@pytest.fixture(scope="session")
def tiny_model_dir(embedded_repos: dict[str, Path]) -> Path:
    from slmops.config import TINY_PHI3_REPO_ID

    return embedded_repos[TINY_PHI3_REPO_ID]


@pytest.fixture(scope="session")
def tiny_onnx_int4_dir(embedded_repos: dict[str, Path]) -> Path:
    from slmops.config import PHI3_ONNX_INT4_SUBFOLDER, TINY_PHI3_ONNX_REPO_ID

    return embedded_repos[TINY_PHI3_ONNX_REPO_ID] / PHI3_ONNX_INT4_SUBFOLDER


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One MLflow SQLite store for all the tests of a module."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(scope="module")
def logged(store, tiny_model_dir, tiny_onnx_int4_dir):
    """The three wrappers of the embedded model, logged once per module into `store`."""
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
def tracking_uri(tmp_path: Path) -> str:
    """A fresh MLflow tracking + registry store on SQLite for one test."""
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server for the session (flows and tasks called directly)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture()
def fake_hub(embedded_repos: dict[str, Path]):
    """A loopback fake Hugging Face hub serving the embedded repos, fresh (no faults) per test."""
    from slmops.fake_hub import FakeHub

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
