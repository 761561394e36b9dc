"""The onnxruntime-genai wrappers run directly (no MLflow store), and the ONNX export task."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModelContext

from offline_kit.tiny_model import TRAINED_ANSWERS, chat_prompt
from slmops.config import OnnxExportSpec
from slmops.onnx_builder import GENAI_CONFIG, OnnxExportError
from slmops.onnx_chat_model import OnnxChatModel, requests_from_input
from slmops.onnx_genai_runtime import OnnxGenerator, TextStream, TextTurn, TurnSpec
from slmops.onnx_prompt_model import ARTIFACT_KEY, OnnxPromptModel, prompts_from_input
from tasks.onnx_export import export_dir, export_onnx, validate_onnx_folder

SPAIN = "What is the capital of Spain?"


def _context(onnx_dir: Path, **config) -> PythonModelContext:
    return PythonModelContext(artifacts={ARTIFACT_KEY: str(onnx_dir)}, model_config=config)


@pytest.fixture(scope="module")
def prompt_model(tiny_onnx_int4_dir: Path) -> OnnxPromptModel:
    model = OnnxPromptModel()
    model.load_context(_context(tiny_onnx_int4_dir, max_new_tokens=32, temperature=0.0))
    return model


@pytest.fixture(scope="module")
def chat_model(tiny_onnx_int4_dir: Path) -> OnnxChatModel:
    model = OnnxChatModel()
    model.load_context(_context(tiny_onnx_int4_dir, max_new_tokens=32, model_name="tiny/phi3"))
    return model


def _ask(question: str, **extra) -> dict:
    return {"messages": [{"role": "user", "content": question}], **extra}


# --- input parsing ------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize(
    "model_input",
    [
        pd.DataFrame({"prompt": ["a", "b"]}),
        {"prompt": ["a", "b"]},
        [{"prompt": "a"}, {"prompt": "b"}],
        ["a", "b"],
    ],
)
def test_prompts_come_from_every_input_form(model_input):
    assert prompts_from_input(model_input) == ["a", "b"]


@pytest.mark.unit
@pytest.mark.parametrize("model_input", [pd.DataFrame({"text": ["a"]}), {"text": "a"}, 3, [1]])
def test_prompt_input_without_prompts_is_rejected(model_input):
    with pytest.raises(MlflowException):
        prompts_from_input(model_input)


@pytest.mark.unit
def test_chat_requests_from_frames_dicts_and_bare_messages():
    messages = [{"role": "user", "content": "hi"}]
    frame = pd.DataFrame({"messages": [messages, messages], "max_tokens": [3, None]})
    from_frame = requests_from_input(frame)
    assert from_frame[0]["max_tokens"] == 3
    assert "max_tokens" not in from_frame[1]  # a NaN pandas filled in is "not sent"
    assert requests_from_input({"messages": messages}) == [{"messages": messages}]
    assert requests_from_input(messages) == [{"messages": messages}]


# --- the prompt wrapper ---------------------------------------------------------------------


@pytest.mark.integration
def test_prompt_model_answers_a_batch_of_trained_questions(prompt_model):
    questions = list(TRAINED_ANSWERS)
    answers = prompt_model.predict(
        None, pd.DataFrame({"prompt": [chat_prompt(q) for q in questions]})
    )
    assert answers == [TRAINED_ANSWERS[q] for q in questions]


@pytest.mark.integration
def test_prompt_model_follows_the_token_budget(tiny_onnx_int4_dir):
    model = OnnxPromptModel()
    model.load_context(_context(tiny_onnx_int4_dir, max_new_tokens=3))
    (answer,) = model.predict(None, {"prompt": chat_prompt(SPAIN)})
    assert answer == "The capital of"


@pytest.mark.integration
def test_a_model_no_longer_used_lets_go_of_its_engine_and_weights(tiny_onnx_int4_dir):
    import gc
    import threading

    def engine_threads() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if t.name == "og-engine"}

    before = engine_threads()
    model = OnnxPromptModel()
    model.load_context(_context(tiny_onnx_int4_dir, max_new_tokens=3))
    model.predict(None, {"prompt": chat_prompt(SPAIN)})
    (thread,) = engine_threads() - before
    # As after MLflow checks an input example while logging: nothing holds the model any more.
    del model
    gc.collect()
    thread.join(timeout=10)
    assert not thread.is_alive()


@pytest.mark.integration
def test_prompt_model_samples_when_temperature_is_set(tiny_onnx_int4_dir):
    model = OnnxPromptModel()
    model.load_context(_context(tiny_onnx_int4_dir, max_new_tokens=8, temperature=1.0))
    (answer,) = model.predict(None, {"prompt": chat_prompt(SPAIN)})
    assert isinstance(answer, str)


@pytest.mark.integration
def test_concurrent_prompt_predictions_match_sequential_ones(prompt_model):
    prompts = [chat_prompt(q) for q in TRAINED_ANSWERS] * 3
    sequential = [prompt_model.predict(None, {"prompt": p})[0] for p in prompts]
    with ThreadPoolExecutor(max_workers=6) as pool:
        concurrent = list(pool.map(lambda p: prompt_model.predict(None, {"prompt": p})[0], prompts))
    assert concurrent == sequential
    assert sequential[: len(TRAINED_ANSWERS)] == list(TRAINED_ANSWERS.values())


# --- the chat wrapper ---------------------------------------------------------------------


@pytest.mark.integration
def test_chat_model_answers_with_a_complete_chat_completion(chat_model):
    (completion,) = chat_model.predict(None, _ask(SPAIN))
    assert completion["object"] == "chat.completion"
    assert completion["id"].startswith("chatcmpl-")
    assert completion["model"] == "tiny/phi3"
    assert isinstance(completion["created"], int)
    (choice,) = completion["choices"]
    assert choice == {
        "index": 0,
        "message": {"role": "assistant", "content": "The capital of Spain is Madrid."},
        "finish_reason": "stop",
    }
    usage = completion["usage"]
    # 18 prompt tokens (as transformers counts them) and 7 answer tokens + <|end|>.
    assert usage == {"prompt_tokens": 18, "completion_tokens": 8, "total_tokens": 26}


@pytest.mark.integration
def test_chat_model_applies_the_system_prompt_template(chat_model):
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Who are you?"},
    ]
    (completion,) = chat_model.predict(None, {"messages": messages})
    assert completion["choices"][0]["message"]["content"] == TRAINED_ANSWERS["Who are you?"]
    assert completion["usage"]["prompt_tokens"] > 18


@pytest.mark.integration
def test_chat_model_reports_length_when_the_budget_runs_out(chat_model):
    (completion,) = chat_model.predict(None, _ask(SPAIN, max_tokens=3))
    assert completion["choices"][0]["finish_reason"] == "length"
    assert completion["choices"][0]["message"]["content"] == "The capital of"
    assert completion["usage"]["completion_tokens"] == 3


@pytest.mark.integration
def test_chat_model_stops_at_a_stop_sequence(chat_model):
    (completion,) = chat_model.predict(None, _ask(SPAIN, stop=["Spain"]))
    choice = completion["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["content"].rstrip() == "The capital of"


@pytest.mark.integration
def test_chat_model_gives_n_choices_and_counts_all_their_tokens(chat_model):
    (completion,) = chat_model.predict(None, _ask(SPAIN, n=2, temperature=0.0))
    assert [c["index"] for c in completion["choices"]] == [0, 1]
    assert completion["usage"]["completion_tokens"] == 16
    usage = completion["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


@pytest.mark.integration
def test_chat_model_answers_a_batch_frame_row_by_row(chat_model):
    frame = pd.DataFrame(
        {"messages": [_ask(q)["messages"] for q in TRAINED_ANSWERS], "temperature": 0.0}
    )
    completions = chat_model.predict(None, frame)
    assert [c["choices"][0]["message"]["content"] for c in completions] == list(
        TRAINED_ANSWERS.values()
    )


@pytest.mark.integration
@pytest.mark.parametrize(
    "request_",
    [
        _ask(SPAIN, stream=True),
        _ask(SPAIN, max_tokens=0),
        _ask(SPAIN, n=100),
        _ask(SPAIN, temperature=5.0),
        {"messages": [{"role": "robot", "content": "hi"}]},
        {"messages": []},
        {"prompt": "no messages"},
    ],
)
def test_chat_model_rejects_bad_requests(chat_model, request_):
    with pytest.raises(MlflowException):
        chat_model.predict(None, request_)


@pytest.mark.integration
def test_min_tokens_and_ignore_eos_fix_the_length(chat_model):
    (short,) = chat_model.predict(None, _ask(SPAIN, max_tokens=40))
    assert short["choices"][0]["finish_reason"] == "stop"
    assert short["usage"]["completion_tokens"] < 30  # the trained answer ends early
    (at_least,) = chat_model.predict(None, _ask(SPAIN, max_tokens=40, min_tokens=30))
    assert at_least["usage"]["completion_tokens"] >= 30
    (fixed,) = chat_model.predict(None, _ask(SPAIN, max_tokens=40, ignore_eos=True))
    assert fixed["choices"][0]["finish_reason"] == "length"
    assert fixed["usage"]["completion_tokens"] == 40
    chunks = list(chat_model.predict_stream(None, _ask(SPAIN, max_tokens=40, ignore_eos=True)))
    assert chunks[-1]["usage"]["completion_tokens"] == 40


@pytest.mark.integration
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"min_tokens": -1}, "min_tokens must be in"),
        ({"min_tokens": 41}, "min_tokens must be in"),
        ({"min_tokens": 2.5}, "whole number"),
        ({"min_tokens": "10"}, "whole number"),
        ({"min_tokens": True}, "whole number"),
        ({"ignore_eos": "yes"}, "ignore_eos must be true or false"),
    ],
)
def test_bad_min_tokens_and_ignore_eos_are_explained(chat_model, extra, message):
    with pytest.raises(MlflowException, match=message):
        chat_model.predict(None, _ask(SPAIN, max_tokens=40, **extra))
    with pytest.raises(MlflowException, match=message):
        next(chat_model.predict_stream(None, _ask(SPAIN, max_tokens=40, **extra)))


@pytest.mark.integration
def test_concurrent_chat_predictions_match_sequential_ones(chat_model):
    requests = [_ask(q) for q in TRAINED_ANSWERS] * 3

    def answer(request: dict) -> tuple[str, dict]:
        (completion,) = chat_model.predict(None, request)
        return completion["choices"][0]["message"]["content"], completion["usage"]

    sequential = [answer(r) for r in requests]
    with ThreadPoolExecutor(max_workers=6) as pool:
        concurrent = list(pool.map(answer, requests))
    assert concurrent == sequential


# --- ONNX folders -------------------------------------------------------------------------


@pytest.mark.unit
def test_validate_onnx_folder_accepts_the_embedded_release(tiny_onnx_int4_dir):
    assert validate_onnx_folder(tiny_onnx_int4_dir) == tiny_onnx_int4_dir


@pytest.mark.unit
def test_validate_onnx_folder_explains_what_is_missing(tiny_onnx_int4_dir, tmp_path):
    with pytest.raises(OnnxExportError, match="does not exist"):
        validate_onnx_folder(tmp_path / "absent")
    # The hub repo root instead of its precision subfolder: a common mistake.
    with pytest.raises(OnnxExportError, match=f"no {GENAI_CONFIG}.*subfolder"):
        validate_onnx_folder(tiny_onnx_int4_dir.parent.parent)
    broken = tmp_path / "broken"
    shutil.copytree(tiny_onnx_int4_dir, broken)
    (broken / "model.onnx").unlink()
    with pytest.raises(OnnxExportError, match="names decoder 'model.onnx'"):
        validate_onnx_folder(broken)
    (broken / GENAI_CONFIG).write_text("{not json")
    with pytest.raises(OnnxExportError, match="not a valid genai config"):
        validate_onnx_folder(broken)


@pytest.mark.unit
def test_export_dir_is_named_by_model_and_spec(tmp_path):
    int4, fp32 = OnnxExportSpec(), OnnxExportSpec(precision="fp32")
    assert export_dir(tmp_path / "a", int4, tmp_path) == export_dir(tmp_path / "a", int4, tmp_path)
    assert export_dir(tmp_path / "a", int4, tmp_path) != export_dir(tmp_path / "b", int4, tmp_path)
    assert export_dir(tmp_path / "a", int4, tmp_path) != export_dir(tmp_path / "a", fp32, tmp_path)


@pytest.mark.unit
def test_export_refuses_a_hub_spec_and_a_folder_without_config(tmp_path):
    with pytest.raises(OnnxExportError, match="validate_onnx_folder"):
        export_onnx.fn(tmp_path, OnnxExportSpec(source="hub"), tmp_path / "out")
    with pytest.raises(OnnxExportError, match="no config.json"):
        export_onnx.fn(tmp_path, OnnxExportSpec(), tmp_path / "out")


@pytest.mark.integration
def test_export_builds_once_into_its_folder(tiny_model_dir, tmp_path):
    spec = OnnxExportSpec(precision="fp32")
    out = export_onnx.fn(tiny_model_dir, spec, tmp_path)
    assert out == export_dir(tiny_model_dir, spec, tmp_path)
    assert json.loads((out / GENAI_CONFIG).read_text())["model"]["type"] == "phi3"
    stamp = (out / GENAI_CONFIG).stat().st_mtime_ns
    assert export_onnx.fn(tiny_model_dir, spec, tmp_path) == out
    assert (out / GENAI_CONFIG).stat().st_mtime_ns == stamp  # reused, not rebuilt
    model = OnnxPromptModel()
    model.load_context(_context(out, max_new_tokens=16))
    assert model.predict(None, {"prompt": chat_prompt(SPAIN)}) == [TRAINED_ANSWERS[SPAIN]]


@pytest.mark.integration
def test_export_task_is_cached_until_its_folder_disappears(
    tiny_model_dir, tmp_path, prefect_harness
):
    from prefect import flow

    spec = OnnxExportSpec()

    @flow
    def export_thrice() -> list:
        return [export_onnx(tiny_model_dir, spec, tmp_path, return_state=True) for _ in range(3)]

    first, second, third = export_thrice()
    # No key while the folder is absent; the second run stores it; the third is served from it.
    assert [first.name, second.name, third.name] == ["Completed", "Completed", "Cached"]
    folder = third.result()
    assert first.result() == folder
    shutil.rmtree(folder)
    states = export_thrice()
    assert states[0].name != "Cached"  # the folder was gone: rebuilt, not a stale path
    assert (states[0].result() / GENAI_CONFIG).is_file()
    assert states[1].name == "Cached"


# --- the shared engine: batching, streaming, cancelling ----------------------------------

# Trained questions end in a few tokens; the others run to their budget.
MIXED_QUESTIONS = [*TRAINED_ANSWERS, "Tell me a long story about the sea.", "Why?"]


def _reference(runtime, question: str, max_tokens: int, stops: list[str]) -> tuple:
    """One completion with a generator of its own (no engine): what the wrappers served before
    the engine, and what validation's runtime comparison still runs."""
    ids = runtime.encode(runtime.chat_prompt([{"role": "user", "content": question}]))

    def hit(new_tokens: list[int]) -> bool:
        return any(s in runtime.decode(new_tokens) for s in stops)

    new_tokens = runtime.generate(ids, max_tokens, stop=hit if stops else None)
    text = runtime.decode(new_tokens)
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    if cuts:
        return text[: min(cuts)], "stop", len(new_tokens)
    ended = bool(new_tokens) and new_tokens[-1] in runtime.eos_ids
    return text, "stop" if ended else "length", len(new_tokens)


@pytest.mark.integration
def test_sixteen_concurrent_greedy_requests_equal_the_reference_loop(chat_model):
    cases = [
        (question, max_tokens, stops)
        for question in MIXED_QUESTIONS
        for max_tokens, stops in ((32, []), (5, ["is M"]))
    ][:16]
    assert len(cases) == 16
    expected = [_reference(chat_model._runtime, *case) for case in cases]

    def answer(case: tuple) -> tuple:
        question, max_tokens, stops = case
        (completion,) = chat_model.predict(None, _ask(question, max_tokens=max_tokens, stop=stops))
        (choice,) = completion["choices"]
        used = completion["usage"]["completion_tokens"]
        return choice["message"]["content"], choice["finish_reason"], used

    with ThreadPoolExecutor(max_workers=16) as pool:
        concurrent = list(pool.map(answer, cases))
    assert concurrent == expected
    assert {finish for _, finish, _ in expected} == {"stop", "length"}  # both kinds covered


@pytest.mark.integration
def test_the_rows_of_one_request_are_generated_in_one_batch(tiny_onnx_int4_dir):
    model = OnnxPromptModel()
    model.load_context(_context(tiny_onnx_int4_dir, max_new_tokens=16, engine_max_batch_size=3))
    prompts = [chat_prompt(q) for q in TRAINED_ANSWERS]
    answers = model.predict(None, {"prompt": prompts})
    assert answers == list(TRAINED_ANSWERS.values())
    engine = model._runtime.engine
    assert engine.max_batch_size == 3 and engine.largest_batch == 3


_THREADS_PROBE = """
import sys, psutil
from pathlib import Path
from slmops.onnx_genai_runtime import OnnxGenerator
threads = None if sys.argv[2] == "unset" else int(sys.argv[2])
generator = OnnxGenerator(Path(sys.argv[1]), threads=threads)
generator.generate(generator.encode("Hello"), 2)
print(generator.threads, psutil.Process().num_threads())
"""


def _threads_in_a_fresh_process(onnx_dir: Path, threads: str) -> tuple[int, int]:
    """(the generator's threads setting, the process's OS threads once it generated)."""
    import subprocess
    import sys

    from slmops.processes import checkout_env

    out = subprocess.run(
        [sys.executable, "-c", _THREADS_PROBE, str(onnx_dir), threads],
        env=checkout_env(), capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    setting, os_threads = out.stdout.split()[-2:]
    return int(setting), int(os_threads)


@pytest.mark.integration
def test_onnxruntime_gets_the_intra_op_threads_asked_for(tiny_onnx_int4_dir, tmp_path):
    from slmops.onnx_genai_runtime import available_cores

    # onnxruntime starts one pool thread per intra-op thread beyond the caller's.
    one, three = (_threads_in_a_fresh_process(tiny_onnx_int4_dir, n) for n in ("1", "3"))
    assert (one[0], three[0]) == (1, 3)
    assert three[1] - one[1] == 2
    # Unset: one per core this process may run on (onnxruntime-genai alone ran one on 2 cores).
    unset = _threads_in_a_fresh_process(tiny_onnx_int4_dir, "unset")
    assert unset[0] == available_cores() and unset[1] - one[1] == available_cores() - 1
    # A folder whose genai_config sets its own count keeps it.
    folder = tmp_path / "own-threads"
    shutil.copytree(tiny_onnx_int4_dir, folder)
    config = json.loads((folder / GENAI_CONFIG).read_text())
    config["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = 3
    (folder / GENAI_CONFIG).write_text(json.dumps(config))
    assert _threads_in_a_fresh_process(folder, "unset") == three


@pytest.mark.integration
def test_turns_waiting_in_the_engine_start_as_one_wave_when_a_wave_ends(tiny_onnx_int4_dir):
    # onnxruntime-genai's CPU engine batches in waves; turns that reach it while one generates
    # (the front door keeps a second batch in flight for this) must all start the next wave.
    generator = OnnxGenerator(tiny_onnx_int4_dir, max_batch_size=4)
    ids = generator.encode(chat_prompt(SPAIN))
    long, short = (TurnSpec(ids, n, min_new_tokens=n) for n in (1000, 200))
    first = generator.submit_many([long] * 4)
    next(iter(first[0]))  # the first wave is generating (for about half a second)
    second = [turn for _ in range(4) for turn in generator.submit_many([short])]  # one by one
    assert generator.engine.in_flight == 8  # all four wait while the first wave generates
    for turn in first + second:
        list(turn)
    assert generator.engine.health()["steps_by_batch"] == {"4": 1200}


@pytest.mark.integration
def test_a_streamed_completion_joins_to_the_whole_one(chat_model):
    request = _ask(SPAIN, max_tokens=32)
    (whole,) = chat_model.predict(None, request)
    chunks = list(chat_model.predict_stream(None, request))
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = [c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]]
    assert len([c for c in content if c]) > 1  # token by token, not one piece
    assert "".join(content) == whole["choices"][0]["message"]["content"]
    assert chunks[-2]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "stop"}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]


@pytest.mark.integration
def test_a_stop_sequence_split_across_tokens_is_never_streamed(chat_model):
    request = _ask(SPAIN, max_tokens=32, stop=["Spain is Ma"])
    (whole,) = chat_model.predict(None, request)
    chunks = list(chat_model.predict_stream(None, request))
    content = [c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]]
    assert "".join(content) == whole["choices"][0]["message"]["content"] == "The capital of "
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.integration
def test_the_prompt_model_streams_what_it_predicts(prompt_model):
    (whole,) = prompt_model.predict(None, {"prompt": chat_prompt(SPAIN)})
    pieces = list(prompt_model.predict_stream(None, {"prompt": chat_prompt(SPAIN)}))
    assert len(pieces) > 1 and "".join(pieces) == whole
    with pytest.raises(MlflowException, match="one prompt"):
        list(prompt_model.predict_stream(None, {"prompt": ["a", "b"]}))


@pytest.mark.unit
def test_text_stream_holds_back_what_may_start_a_stop_sequence():
    pieces = {1: "ab", 2: "c", 3: "d", 4: "e"}

    def decode(tokens: list[int]) -> str:
        return "".join(pieces[t] for t in tokens)

    stopped = TextStream(decode, ["cd"])
    assert [stopped.push(t) for t in (1, 2, 3)] == ["ab", "", ""]
    assert stopped.stopped and stopped.text == "ab" and stopped.finish() == ""
    passed = TextStream(decode, ["cd"])
    assert [passed.push(t) for t in (1, 2, 4)] == ["ab", "", "ce"]
    assert not passed.stopped and passed.finish() == "" and passed.text == "abce"
    held = TextStream(decode, ["cd"])
    assert [held.push(t) for t in (1, 2)] == ["ab", ""] and held.finish() == "c"


@pytest.mark.integration
def test_a_stream_closed_early_cancels_its_turn_and_frees_the_engine(chat_model):
    runtime = chat_model._runtime
    ids = runtime.encode(chat_prompt(SPAIN))
    # A turn that cannot end early (end tokens masked) would run for seconds.
    (text_turn,) = TextTurn.start(runtime, [TurnSpec(ids, 2000, min_new_tokens=2000)])
    deltas = text_turn.deltas()
    assert next(deltas)
    deltas.close()
    made_after = list(text_turn.turn)  # what was made before the engine saw the cancel
    assert text_turn.turn.finish_reason == "cancelled" and len(made_after) < 1000
    assert runtime.engine.in_flight == 0
    assert runtime.engine.health()["finished"]["cancelled"] >= 1
    (after,) = chat_model.predict(None, _ask(SPAIN))  # the engine still answers
    assert after["choices"][0]["message"]["content"] == TRAINED_ANSWERS[SPAIN]
