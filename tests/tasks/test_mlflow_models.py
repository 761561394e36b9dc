"""The three MLflow models of a release, logged into a real SQLite store and loaded back."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from mlflow.models import Model, infer_signature

from offline_kit.tiny_model import TRAINED_ANSWERS, chat_prompt
from slmops.config import GenerationSpec, OnnxExportSpec, WrapperKind
from slmops.onnx_builder import OnnxExportError
from slmops.refs import LoggedModelRef
from slmops.signatures import PROMPT_INPUT_EXAMPLE, expected_signature
from slmops.store import ModelStore
from tasks.mlflow_models import (
    CANDIDATE_TAG,
    FAILURE_TAG,
    ArtifactStoreError,
    ArtifactStoreUnavailableError,
    SnapshotError,
    _check_source,
    artifact_store_failure,
    check_causal_lm,
    log_chat_pipeline,
    log_onnx_chat_model,
    log_onnx_prompt_model,
)
from tasks.retrying import is_transient, retry_if_transient
from tasks.validation import local_model_dir

SOURCE = {"repo": "slmops/tiny-phi3", "commit": "0123abcd"}
GENERATION = GenerationSpec(max_new_tokens=32)
SPAIN = "What is the capital of Spain?"


def _load(store: ModelStore, ref: LoggedModelRef):
    return mlflow.pyfunc.load_model(str(local_model_dir(store, ref)))


def _no_models_logged(store: ModelStore) -> bool:
    client = store.client()
    experiments = [e.experiment_id for e in client.search_experiments()]
    return not experiments or not client.search_logged_models(experiment_ids=experiments)


# --- unit -----------------------------------------------------------------------------------


@pytest.mark.unit
def test_causal_lm_check_names_the_problem(tiny_model_dir, tmp_path):
    assert check_causal_lm(tiny_model_dir) == "Phi3ForCausalLM"
    with pytest.raises(SnapshotError, match="no config.json"):
        check_causal_lm(tmp_path)
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"]})
    )
    with pytest.raises(SnapshotError, match="not a causal language model.*'bert'"):
        check_causal_lm(tmp_path)


@pytest.mark.unit
def test_source_needs_a_repo_and_a_commit():
    assert _check_source({"repo_id": "a/b", "commit": "c", "revision": "main"}) == {
        "repo": "a/b",
        "commit": "c",
        "revision": "main",
    }
    with pytest.raises(ValueError, match="commit"):
        _check_source({"repo": "a/b"})


@pytest.mark.unit
def test_only_transient_failures_are_retried():
    class State:
        def __init__(self, error: Exception):
            self.error = error

        def result(self, raise_on_failure: bool = True):
            return self.error

    busy = "(sqlite3.OperationalError) database is locked"
    assert retry_if_transient(None, None, State(mlflow.exceptions.MlflowException(busy)))
    assert not retry_if_transient(
        None, None, State(mlflow.exceptions.MlflowException("no such model"))
    )
    assert not retry_if_transient(None, None, State(SnapshotError("bert")))
    assert not retry_if_transient(None, None, State(OnnxExportError("missing")))


# --- logging and loading back -----------------------------------------------------------------


@pytest.mark.integration
def test_each_task_returns_a_ref_to_a_finished_candidate_run(store, logged):
    client = store.client()
    for kind, ref in logged.items():
        assert ref.kind is kind
        assert ref.model_uri == f"models:/{ref.model_id}"
        run = client.get_run(ref.run_id)
        assert run.info.status == "FINISHED"
        assert run.data.tags[CANDIDATE_TAG] == "true"
        assert run.data.tags["slmops.kind"] == kind.value
        assert run.data.params["source.repo"] == SOURCE["repo"]
        assert run.data.params["source.commit"] == SOURCE["commit"]
        assert run.data.params["generation.max_new_tokens"] == "32"
        model = client.get_logged_model(ref.model_id)
        assert model.source_run_id == ref.run_id
        assert model.params["source.commit"] == SOURCE["commit"]
        assert model.artifact_location.startswith(
            Path(store.tracking_uri.removeprefix("sqlite:///")).parent.as_uri()
        )
    onnx_params = client.get_run(logged[WrapperKind.PROMPT_ONNX].run_id).data.params
    assert onnx_params["onnx.precision"] == "int4"


@pytest.mark.integration
def test_pipeline_model_stores_its_weights(store, logged):
    folder = local_model_dir(store, logged[WrapperKind.CHAT_TRANSFORMERS])
    assert list((folder / "model").glob("*.safetensors"))
    flavor = Model.load(str(folder / "MLmodel")).flavors["transformers"]
    assert flavor["inference_task"] == "llm/v1/chat"
    assert "source_model_revision" not in flavor  # not a hub reference


@pytest.mark.integration
def test_signatures_are_the_expected_ones(store, logged):
    signatures = {
        kind: Model.load(str(local_model_dir(store, ref) / "MLmodel")).signature
        for kind, ref in logged.items()
    }
    # The ONNX chat model is interchangeable with the transformers one.
    assert signatures[WrapperKind.CHAT_ONNX] == signatures[WrapperKind.CHAT_TRANSFORMERS]
    assert signatures[WrapperKind.CHAT_TRANSFORMERS] == expected_signature(WrapperKind.CHAT_ONNX)
    # The document's prompt model: infer_signature(input_example, ["Run"]).
    prompt = signatures[WrapperKind.PROMPT_ONNX]
    assert prompt == infer_signature(PROMPT_INPUT_EXAMPLE, ["Run"])
    assert prompt.params is None


@pytest.mark.integration
def test_all_three_models_answer_known_questions(store, logged):
    chat = {"messages": [{"role": "user", "content": SPAIN}]}
    for kind in (WrapperKind.CHAT_TRANSFORMERS, WrapperKind.CHAT_ONNX):
        (completion,) = _load(store, logged[kind]).predict(chat)
        assert "Madrid" in completion["choices"][0]["message"]["content"]
        assert completion["choices"][0]["finish_reason"] == "stop"
    prompt_model = _load(store, logged[WrapperKind.PROMPT_ONNX])
    assert "Madrid" in prompt_model.predict({"prompt": chat_prompt(SPAIN)})[0]


@pytest.mark.integration
def test_chat_models_agree_on_answers_and_token_counts(store, logged):
    answers = {}
    for kind in (WrapperKind.CHAT_TRANSFORMERS, WrapperKind.CHAT_ONNX):
        model = _load(store, logged[kind])
        answers[kind] = []
        for question in TRAINED_ANSWERS:
            for max_tokens in (None, 3):
                request = {"messages": [{"role": "user", "content": question}]}
                if max_tokens:
                    request["max_tokens"] = max_tokens
                (completion,) = model.predict(request)
                choice = completion["choices"][0]
                answers[kind].append(
                    (choice["message"]["content"], choice["finish_reason"], completion["usage"])
                )
    assert answers[WrapperKind.CHAT_ONNX] == answers[WrapperKind.CHAT_TRANSFORMERS]


@pytest.mark.integration
def test_prompt_model_answers_a_batch(store, logged):
    model = _load(store, logged[WrapperKind.PROMPT_ONNX])
    batch = pd.DataFrame({"prompt": [chat_prompt(q) for q in TRAINED_ANSWERS]})
    assert model.predict(batch) == list(TRAINED_ANSWERS.values())


@pytest.mark.integration
def test_loaded_onnx_models_are_safe_under_concurrent_requests(store, logged):
    prompt_model = _load(store, logged[WrapperKind.PROMPT_ONNX])
    chat_model = _load(store, logged[WrapperKind.CHAT_ONNX])
    questions = list(TRAINED_ANSWERS) * 4

    def ask(question: str) -> tuple[str, str]:
        (text,) = prompt_model.predict({"prompt": chat_prompt(question)})
        (completion,) = chat_model.predict({"messages": [{"role": "user", "content": question}]})
        return text, completion["choices"][0]["message"]["content"]

    sequential = [ask(q) for q in questions]
    with ThreadPoolExecutor(max_workers=8) as pool:
        concurrent = list(pool.map(ask, questions))
    assert concurrent == sequential
    assert [pair[0] for pair in sequential] == [TRAINED_ANSWERS[q] for q in questions]


# --- bad input logs nothing ---------------------------------------------------------------------


@pytest.mark.integration
def test_a_bert_snapshot_is_rejected_before_anything_is_logged(fresh_store, tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "bert", "architectures": ["BertModel"], "hidden_size": 8})
    )
    with pytest.raises(SnapshotError, match="not a causal language model"):
        log_chat_pipeline.fn(fresh_store, "release", tmp_path, GENERATION, SOURCE)
    assert _no_models_logged(fresh_store)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SnapshotError, match="no config.json"):
        log_chat_pipeline.fn(fresh_store, "release", empty, GENERATION, SOURCE)
    assert _no_models_logged(fresh_store)


@pytest.mark.integration
def test_a_missing_onnx_folder_is_rejected_before_anything_is_logged(fresh_store, tmp_path):
    for task in (log_onnx_prompt_model, log_onnx_chat_model):
        with pytest.raises(OnnxExportError, match="does not exist"):
            task.fn(fresh_store, "release", tmp_path / "nope", GENERATION, OnnxExportSpec(), SOURCE)
    assert _no_models_logged(fresh_store)


@pytest.mark.integration
def test_logged_onnx_models_stay_loaded_nowhere(fresh_store, tiny_onnx_int4_dir):
    import threading

    def engine_threads() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if t.name == "og-engine"}

    before = engine_threads()
    for log in (log_onnx_prompt_model, log_onnx_chat_model):
        log.fn(fresh_store, "release", tiny_onnx_int4_dir, GENERATION, OnnxExportSpec(), SOURCE)
    # MLflow loaded each model to check its input example; an engine thread left running
    # would hold its weights in the flow's process (3.5 GB for Phi-3-mini).
    started = engine_threads() - before
    for thread in started:
        thread.join(timeout=10)
    assert not [t for t in started if t.is_alive()]


@pytest.mark.integration
def test_a_source_without_commit_is_rejected(fresh_store, tiny_onnx_int4_dir):
    with pytest.raises(ValueError, match="commit"):
        log_onnx_prompt_model.fn(
            fresh_store,
            "release",
            tiny_onnx_int4_dir,
            OnnxExportSpec(),
            GENERATION,
            {"repo": "a/b"},
        )
    assert _no_models_logged(fresh_store)


@pytest.mark.integration
def test_a_failure_while_logging_leaves_a_failed_non_candidate_run(
    fresh_store, tiny_onnx_int4_dir, monkeypatch
):
    real_log_model = mlflow.pyfunc.log_model

    def log_then_fail(**kwargs):
        real_log_model(**kwargs)  # a LoggedModel now exists
        raise RuntimeError("artifact store went away")

    monkeypatch.setattr(mlflow.pyfunc, "log_model", log_then_fail)
    with pytest.raises(RuntimeError, match="went away"):
        log_onnx_chat_model.fn(
            fresh_store, "release", tiny_onnx_int4_dir, GENERATION, OnnxExportSpec(), SOURCE
        )
    client = fresh_store.client()
    (run,) = client.search_runs([client.get_experiment_by_name("release").experiment_id])
    assert run.info.status == "FAILED"
    assert run.data.tags[CANDIDATE_TAG] == "false"
    assert "went away" in run.data.tags[FAILURE_TAG]
    assert _no_models_logged(fresh_store)


# --- caching ------------------------------------------------------------------------------------


@pytest.mark.integration
def test_logging_is_cached_per_store(tiny_onnx_int4_dir, tmp_path, prefect_harness):
    from prefect import flow

    stores = [ModelStore(tracking_uri=f"sqlite:///{tmp_path / name}.db") for name in ("a", "b")]

    @flow
    def log_into(stores: list[ModelStore]) -> list:
        return [
            log_onnx_prompt_model(
                store, "release", tiny_onnx_int4_dir, GENERATION, OnnxExportSpec(), SOURCE,
                return_state=True,
            )
            for store in stores
        ]  # fmt: skip

    first_a, first_b, again_a = log_into([stores[0], stores[1], stores[0]])
    assert [first_a.name, first_b.name, again_a.name] == ["Completed", "Completed", "Cached"]
    assert again_a.result() == first_a.result()
    # A different store never gets the other store's model.
    assert first_b.result().model_id != first_a.result().model_id
    for store, state in zip(stores, (first_a, first_b), strict=True):
        assert store.client().get_logged_model(state.result().model_id)


@pytest.mark.integration
def test_bad_input_is_not_retried(tmp_path, fresh_store, monkeypatch, prefect_harness):
    from prefect import flow

    import tasks.mlflow_models as mlflow_models

    calls = []
    real_check = mlflow_models.check_causal_lm
    monkeypatch.setattr(
        mlflow_models, "check_causal_lm", lambda path: calls.append(path) or real_check(path)
    )

    @flow
    def log_bad():
        return log_chat_pipeline(
            fresh_store, "release", tmp_path, GENERATION, SOURCE, return_state=True
        )

    assert log_bad(return_state=True).is_failed()
    assert len(calls) == 1  # retries=2 is for the store, not for a folder that is not a model
    assert _no_models_logged(fresh_store)


@pytest.mark.unit
def test_an_artifact_store_failure_is_explained_and_retried_only_when_transient():
    store = ModelStore(tracking_uri="http://127.0.0.1:5000")
    url = "http://127.0.0.1:5000/api/2.0/mlflow-artifacts/artifacts/1/abc/artifacts/model.bin"
    down = MlflowException(
        f"API request to {url} failed with exception HTTPConnectionPool(host='127.0.0.1', "
        "port=5000): Max retries exceeded (Caused by ResponseError('too many 500 error "
        "responses'))"
    )
    explained = artifact_store_failure(down, store)
    assert isinstance(explained, ArtifactStoreUnavailableError) and is_transient(explained)
    assert "the artifact store behind http://127.0.0.1:5000" in str(explained)
    assert "--artifacts-destination" in str(explained) and url in str(explained)

    # The cause past the first 300 characters still counts.
    long_url = url.replace("model.bin", "x" * 400)
    down_long = MlflowException(
        f"API request to {long_url} failed with exception HTTPConnectionPool(host='h', "
        "port=1): Max retries exceeded (Caused by ResponseError('too many 500 error responses'))"
    )
    assert isinstance(artifact_store_failure(down_long, store), ArtifactStoreUnavailableError)

    refused = MlflowException(f"API request to {url} failed with error code 403 != 200")
    explained = artifact_store_failure(refused, store)
    assert type(explained) is ArtifactStoreError and not is_transient(explained)

    assert artifact_store_failure(ValueError("not a causal LM"), store) is None
    assert artifact_store_failure(MlflowException("RESOURCE_DOES_NOT_EXIST"), store) is None


@pytest.mark.integration
def test_the_logged_onnx_models_stream_through_pyfunc(store, logged):
    chat = _load(store, logged[WrapperKind.CHAT_ONNX])
    request = {"messages": [{"role": "user", "content": "What is the capital of Spain?"}]}
    (whole,) = chat.predict(request)
    chunks = list(chat.predict_stream(request))
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert content == whole["choices"][0]["message"]["content"]
    assert chunks[-1]["usage"] == whole["usage"]
    prompt = _load(store, logged[WrapperKind.PROMPT_ONNX])
    question = {"prompt": chat_prompt("What is the capital of Spain?")}
    assert "".join(prompt.predict_stream(question)) == prompt.predict(question)[0]
