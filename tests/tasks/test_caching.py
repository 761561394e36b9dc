"""Cached task results are reused only while what they point at exists, and verdict caches
cover the code that decides the verdict."""

from __future__ import annotations

import pytest
from prefect import flow

from slmops.config import GenerationSpec, OnnxExportSpec
from tasks.caching import SourceFiles
from tasks.mlflow_models import log_onnx_prompt_model

pytestmark = pytest.mark.integration

SOURCE = {"repo": "slmops/tiny-phi3", "commit": "0123abcd"}


def test_a_cached_logged_model_that_was_deleted_is_logged_again(
    prefect_harness, fresh_store, tiny_onnx_int4_dir
):
    @flow(name="log-twice")
    def log_prompt_model():
        return log_onnx_prompt_model(
            fresh_store, "release", tiny_onnx_int4_dir, GenerationSpec(max_new_tokens=7),
            OnnxExportSpec(), SOURCE, return_state=True,
        )  # fmt: skip

    first = log_prompt_model()
    cached = log_prompt_model()
    assert cached.name == "Cached"
    assert cached.result().model_id == first.result().model_id

    client = fresh_store.client()
    client.delete_logged_model(first.result().model_id)
    again = log_prompt_model()
    assert again.name == "Completed", again
    assert again.result().model_id != first.result().model_id
    assert client.get_logged_model(again.result().model_id).model_id == again.result().model_id
    # ... and the new one is what later runs reuse.
    assert log_prompt_model().result().model_id == again.result().model_id


def test_the_validation_cache_key_covers_the_source_of_its_checks(tmp_path):
    from tasks import validation

    checked = {path.name for path in validation.VALIDATION_CACHE_POLICY_SOURCES.paths}
    assert {"expectations.py", "signatures.py", "validation.py"} <= checked

    module = tmp_path / "suite.py"
    module.write_text("MIN_WORDS = 1\n")
    policy = SourceFiles(paths=(module,))
    before = policy.compute_key(None, {}, {})  # type: ignore[arg-type]
    module.write_text("MIN_WORDS = 2\n")
    assert policy.compute_key(None, {}, {}) != before  # type: ignore[arg-type]
