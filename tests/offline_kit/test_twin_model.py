"""The full-size rehearsal's code path at CI size: Phi-3-mini's full width with one layer.

The twin (`offline_kit.twin_model`) with one decoder layer keeps what makes Phi-3-mini expensive
(hidden 3072, vocab 32064, two bf16 shards: 0.6 GB) and runs the same code as the 32-layer one:
shard handling, the checkpoint's dtype, the ONNX folder stored once per release, the builder's
memory guard and the memory check before a server switch.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from offline_kit.twin_model import (
    PHI3_MINI_CONFIG,
    TWIN_ONNX_REPO_ID,
    TWIN_REPO_ID,
    ensure_twin_repos,
    tensor_plan,
    twin_config,
)
from slmops.config import (
    PHI3_ONNX_INT4_SUBFOLDER,
    GateSpec,
    GenerationSpec,
    HubSpec,
    ModelServerSpec,
    OnnxExportSpec,
    RegistrySpec,
    ReleaseConfig,
    ServeFlowConfig,
    ServeSpec,
    Settings,
    ValidationSpec,
    WrapperKind,
)
from slmops.onnx_builder import (
    GIB,
    BuildMemoryError,
    build_onnx_model,
    predicted_peak_bytes,
    run_within_memory,
)
from slmops.serving_memory import (
    kv_bytes_per_token,
    onnx_server_sizing,
    plan_switch,
    transformers_server_sizing,
    unknown_server_sizing,
)
from slmops.store import ModelStore
from tests.conftest import EMBEDDED_CACHE

PHI3_MINI_PARAMETERS = 3_821_079_552


@pytest.fixture(scope="session")
def twin(tiny_model_dir):
    """The one-layer twin and its int4 ONNX release, built once per machine (~40 s)."""
    return ensure_twin_repos(EMBEDDED_CACHE / "twin", tiny_model_dir, num_layers=1)


@pytest.mark.unit
def test_full_size_plan_is_phi3_minis_parameter_count():
    plan = tensor_plan(twin_config(32))
    assert sum(p.numel for p in plan) == PHI3_MINI_PARAMETERS
    assert sum(p.nbytes for p in plan) == 2 * PHI3_MINI_PARAMETERS  # bf16


@pytest.mark.unit
def test_twin_config_rejects_a_layer_count_phi3_mini_does_not_have():
    with pytest.raises(ValueError, match="num_layers must be between 1 and 32"):
        twin_config(33)


@pytest.mark.integration
def test_twin_has_phi3_minis_shapes_in_two_bf16_shards(twin):
    from safetensors import safe_open
    from transformers import AutoTokenizer

    config = json.loads((twin.model_dir / "config.json").read_text())
    for key in ("hidden_size", "intermediate_size", "vocab_size", "num_attention_heads"):
        assert config[key] == PHI3_MINI_CONFIG[key]
    assert config["num_hidden_layers"] == 1 and config["torch_dtype"] == "bfloat16"
    index = json.loads((twin.model_dir / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    seen = {}
    for shard in shards:
        with safe_open(str(twin.model_dir / shard), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                seen[name] = f.get_slice(name)
                assert f.get_slice(name).get_dtype() == "BF16"
    assert set(seen) == set(index["weight_map"])
    stored = sum(2 * math.prod(s.get_shape()) for s in seen.values())
    assert stored == index["metadata"]["total_size"]
    with safe_open(str(twin.model_dir / index["weight_map"]["lm_head.weight"]), "pt") as f:
        lm_head = f.get_tensor("lm_head.weight")
    eos = json.loads((twin.model_dir / "generation_config.json").read_text())["eos_token_id"]
    # Deterministic, bounded generation: only ids the tokenizer knows, never an early stop.
    assert lm_head[592:].abs().sum() == 0 and lm_head[eos].abs().sum() == 0
    printable = [i for i in range(592) if lm_head[i].abs().sum() > 0]
    assert len(printable) > 100
    tokenizer = AutoTokenizer.from_pretrained(twin.model_dir)
    assert all(tokenizer.decode([i], skip_special_tokens=True).strip() for i in printable)


@pytest.mark.integration
def test_streamed_int4_build_equals_the_builders_own(tiny_model_dir, tmp_path):
    import numpy as np
    import onnx
    from onnx import numpy_helper

    ours = build_onnx_model(tiny_model_dir, tmp_path / "ours", OnnxExportSpec())
    theirs = tmp_path / "theirs"
    subprocess.run(
        [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(tiny_model_dir),
         "-o", str(theirs), "-c", str(tmp_path / "cache"), *OnnxExportSpec().builder_args()],
        check=True, capture_output=True,
    )  # fmt: skip

    def load(folder: Path):
        model = onnx.load(str(folder / "model.onnx"))
        tensors = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        nodes = [(n.op_type, n.name, list(n.input), list(n.output)) for n in model.graph.node]
        return tensors, nodes

    our_tensors, our_nodes = load(ours)
    their_tensors, their_nodes = load(theirs)
    assert our_nodes == their_nodes
    assert any(op == "MatMulNBits" for op, *_ in our_nodes)
    assert our_tensors.keys() == their_tensors.keys()
    differ = {
        k: float(np.max(np.abs(our_tensors[k].astype(np.float64) - their_tensors[k])))
        for k in our_tensors
        if not np.array_equal(our_tensors[k], their_tensors[k])
    }
    assert not differ, differ  # name -> largest difference
    assert (ours / "genai_config.json").read_text() == (theirs / "genai_config.json").read_text()


@pytest.mark.integration
def test_build_is_refused_when_its_predicted_peak_does_not_fit(tiny_model_dir, tmp_path):
    spec = OnnxExportSpec()
    predicted = predicted_peak_bytes(tiny_model_dir, spec)
    with pytest.raises(BuildMemoryError, match="predicted peak.*short"):
        build_onnx_model(tiny_model_dir, tmp_path / "out", spec, memory_budget_bytes=predicted - 1)
    assert list(tmp_path.iterdir()) == []  # nothing started, nothing left behind


@pytest.mark.unit
def test_watchdog_stops_a_process_past_its_memory_budget():
    hog = "b = bytearray(600 << 20); import time; time.sleep(60)"
    with pytest.raises(BuildMemoryError, match="over its budget of 0.2 GiB"):
        run_within_memory([sys.executable, "-c", hog], budget_bytes=GIB // 5)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("budget_gib", "order"),
    [(None, "blue-green"), (20, "blue-green"), (14, "stop-first"), (6, "refuse")],
)
def test_switch_order_follows_the_memory_budget(budget_gib, order):
    plan = plan_switch(
        running_bytes=10 * GIB,  # the old server (8 GiB) and another (2 GiB)
        replaced_bytes=8 * GIB,
        new_bytes=8 * GIB,
        available_bytes=13 * GIB,
        budget_bytes=None if budget_gib is None else budget_gib * GIB,
    )
    assert plan.order == order
    assert plan.gap_bytes == max(0, 18 * GIB - min(23, budget_gib or 23) * GIB)
    assert ("over" in plan.describe()) == (order != "blue-green")


@pytest.mark.unit
def test_a_server_whose_weights_were_evicted_counts_at_its_models_size():
    # new-commit at 67baa8a: the bf16 champion read 0.6 GiB (its mapped weights evicted), the
    # two ONNX servers 3.5 GiB each. Counted at its RSS the new server looked like it fit
    # beside it; counted at its files (7.1 GiB) it fits only once the old one is stopped.
    rss, files = 0.6 * GIB, 7.1 * GIB
    onnx = 2 * 3.5 * GIB
    new = unknown_server_sizing(int(files)).expected_bytes
    plan = plan_switch(
        running_bytes=int(max(rss, files) + onnx), replaced_bytes=int(max(rss, files)),
        new_bytes=new, available_bytes=14 * GIB, budget_bytes=20 * 10**9,
        measured_bytes=int(rss + onnx),
    )  # fmt: skip
    assert plan.order == "stop-first"
    # The machine's share is what the servers hold now plus what is available (the evicted
    # pages are in `available`), not the counted sizes: the budget binds here.
    assert plan.limit_bytes == 20 * 10**9
    naive = plan_switch(
        running_bytes=int(rss + onnx), replaced_bytes=int(rss), new_bytes=new,
        available_bytes=14 * GIB, budget_bytes=20 * 10**9,
    )  # fmt: skip
    assert naive.order == "blue-green"


@pytest.mark.unit
def test_switch_stops_first_when_the_machine_cannot_hold_both():
    plan = plan_switch(
        running_bytes=8 * GIB, replaced_bytes=8 * GIB, new_bytes=8 * GIB,
        available_bytes=4 * GIB, budget_bytes=None,
    )  # fmt: skip
    assert plan.order == "stop-first" and plan.gap_bytes == 4 * GIB


# Phi-3-mini's int4 CPU build, as its genai_config.json describes the decoder.
PHI3_GENAI_CONFIG = {
    "model": {
        "context_length": 4096,
        "decoder": {"head_size": 96, "num_attention_heads": 32, "num_hidden_layers": 32,
                    "num_key_value_heads": 32},
    }
}  # fmt: skip


@pytest.mark.unit
def test_an_onnx_server_is_sized_with_a_full_batch_of_key_value_caches():
    # Measured on the 32-layer twin (fresh process, 4 concurrent short turns): a loaded 3.48 GB
    # grew to 9.96 GB at 4 x 2048 tokens; 1 x 2048: +1.62 GB; 4 x 512: +1.65 GB.
    sizing = onnx_server_sizing(2_722_861_056, PHI3_GENAI_CONFIG, 4, 4, 2048)
    assert sizing.kv_bytes_per_token == 786_432  # fp32 key and value, 32 layers x 32 heads x 96
    assert sizing.kv_bytes == 4 * 2048 * 786_432  # 6.44 GB
    assert sizing.expected_bytes > 3.48e9 + 6.44e9
    # A budget past the model's context is capped at it, as OnnxGenerator caps it.
    assert onnx_server_sizing(1, PHI3_GENAI_CONFIG, 4, 1, 8192).kv_tokens_per_turn == 4096
    assert "KV cache 6.00 GiB (4 x 2048 tokens x 768 KiB)" in sizing.describe()


@pytest.mark.unit
def test_a_transformers_server_is_sized_with_one_turn_of_its_context_in_its_dtype():
    sizing = transformers_server_sizing(7_642_181_880, twin_config(32))
    assert sizing.kv_bytes_per_token == kv_bytes_per_token(32, 32, 96, 2) == 393_216  # bf16
    assert sizing.kv_bytes == 4096 * 393_216
    assert sizing.weights_bytes == 7_642_181_880  # mapped 1:1 (7.7 GB RSS measured)


@pytest.mark.integration
def test_the_onnx_engine_reserves_what_the_sizing_counts(twin):
    """The law the sizing rests on, measured: each turn in the engine's batch reserves its whole
    token budget of key-value cache at its first step, whatever its length."""
    onnx_dir = twin.onnx_repo_dir / PHI3_ONNX_INT4_SUBFOLDER
    probe = (
        "import json, sys, psutil\n"
        "from slmops.onnx_genai_runtime import OnnxGenerator, TurnSpec\n"
        "me = psutil.Process()\n"
        "g = OnnxGenerator(__import__('pathlib').Path(sys.argv[1]), max_batch_size=4, "
        "token_budget=2048)\n"
        "before = me.memory_info().rss\n"
        "turns = g.submit_many([TurnSpec(g.encode('Hello there'), 4, min_new_tokens=4)] * 4)\n"
        "assert all(len(list(t)) == 4 for t in turns)\n"
        "print(json.dumps({'grew': me.memory_info().rss - before, "
        "'batch': g.engine.largest_batch}))\n"
    )
    from slmops.processes import checkout_env

    out = subprocess.run(
        [sys.executable, "-c", probe, str(onnx_dir)], env=checkout_env(),
        capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    genai_config = json.loads((onnx_dir / "genai_config.json").read_text())
    sizing = onnx_server_sizing(0, genai_config, 4, 4, 2048)
    assert measured["batch"] == 4
    # One layer: 4 x 2048 x 24 KiB = 201 MB reserved, plus ~25 MB of the step's own buffers
    # (measured 229 MB), which the server's base allowance covers.
    assert 0.95 * sizing.kv_bytes <= measured["grew"] <= sizing.kv_bytes + 64e6


@pytest.fixture(scope="module")
def twin_release(twin, tmp_path_factory, prefect_harness):
    """One release of the twin through the fake hub (`source: hub`, as for the real model)."""
    from flows.release import release
    from flows.serve import serve
    from offline_kit.fake_hub import FakeHub

    home = tmp_path_factory.mktemp("twin-home")
    config = ReleaseConfig(
        hub=HubSpec(
            source="hub", repo_id=TWIN_REPO_ID, onnx_repo_id=TWIN_ONNX_REPO_ID,
            onnx_subfolder=PHI3_ONNX_INT4_SUBFOLDER,
        ),
        onnx=OnnxExportSpec(source="hub"),
        generation=GenerationSpec(max_new_tokens=4),
        # Random weights: structure only; loaded in a fresh process, as for the real model.
        validation=ValidationSpec(reference_answers=False, fresh_process=True),
        gate=GateSpec(min_score=0.0),  # random weights answer noise: no quality floor
        registry=RegistrySpec(name_prefix="phi3-mini-twin"),
        serve=ServeSpec(kinds=(WrapperKind.CHAT_TRANSFORMERS, WrapperKind.PROMPT_ONNX),
                        front_door=False),
        runtime_parity=False,
    )  # fmt: skip
    with FakeHub(twin.as_hub_repos()) as hub, pytest.MonkeyPatch.context() as patch:
        patch.setenv("SLMOPS_HOME", str(home))
        patch.setenv("HF_ENDPOINT", hub.endpoint)
        settings = Settings.from_env()
        report = release(config)
        yield settings, config, report
        serve(ServeFlowConfig(action="stop", registry=config.registry, serve=config.serve))


def _mlmodel(settings: Settings, model_uri: str) -> dict:
    from tasks.serving import local_model_folder

    folder = local_model_folder(model_uri, ModelStore.from_settings(settings))
    assert folder.is_relative_to(settings.home / "mlartifacts")  # the stored folder, not a copy
    return yaml.safe_load((folder / "MLmodel").read_text())


@pytest.mark.e2e
def test_twin_release_is_validated_promoted_and_served(twin_release):
    _, config, report = twin_release
    for outcome in report.outcomes:
        assert outcome.validation_passed and outcome.promoted, outcome.validation_summary
    served = {o.kind for o in report.outcomes if o.endpoint}
    assert served == set(config.serve.kinds)


@pytest.mark.e2e
def test_twin_release_fetched_both_shards(twin_release):
    settings, _, report = twin_release
    hf_home = settings.cache_dir / "huggingface"
    shards = {p.name for p in hf_home.rglob("model-0000*-of-00002.safetensors")}
    assert shards == {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}
    assert list(hf_home.rglob("model.safetensors.index.json"))


@pytest.mark.e2e
def test_transformers_wrapper_is_stored_and_loaded_in_bf16(twin_release):
    import mlflow
    import torch

    settings, _, report = twin_release
    outcome = next(o for o in report.outcomes if o.kind is WrapperKind.CHAT_TRANSFORMERS)
    uri = outcome.model_uri
    flavor = _mlmodel(settings, uri)["flavors"]["transformers"]
    registered = f"models:/{outcome.registered_model}/{outcome.version}"
    assert _mlmodel(settings, registered)["flavors"]["transformers"] == flavor
    assert flavor["torch_dtype"] == "torch.bfloat16"
    mlflow.set_tracking_uri(settings.tracking_uri)
    try:
        # What `mlflow models serve` runs to load it.
        pipeline = mlflow.transformers.load_model(uri)
    finally:
        mlflow.set_tracking_uri(None)  # type: ignore[arg-type]
    assert pipeline.model.dtype == torch.bfloat16


@pytest.mark.e2e
def test_onnx_folder_is_stored_once_and_shared_by_both_wrappers(twin_release):
    settings, _, report = twin_release
    onnx_uris = set()
    for outcome in report.outcomes:
        if outcome.kind is WrapperKind.CHAT_TRANSFORMERS:
            continue
        conf = _mlmodel(settings, outcome.model_uri)["flavors"]["python_function"]
        onnx_uris.add(conf["config"]["onnx_model_uri"])  # the model_config
    assert len(onnx_uris) == 1
    stored = list((settings.home / "mlartifacts").rglob("model.onnx.data"))
    assert len(stored) == 1, stored
    assert stored[0].parent == Path(onnx_uris.pop().removeprefix("file://"))


@pytest.mark.e2e
def test_a_switch_that_cannot_fit_beside_the_old_server_stops_it_first(twin_release):
    from tasks.serving import (
        ServingError,
        is_running,
        model_server_sizing,
        running_servers_footprint,
        serve_model,
        status_of,
    )

    settings, config, report = twin_release
    store = ModelStore.from_settings(settings)
    outcome = next(o for o in report.outcomes if o.kind is WrapperKind.PROMPT_ONNX)
    name = outcome.registered_model
    old = status_of(settings.servers_dir, name).handle
    assert old is not None
    running = running_servers_footprint(settings.servers_dir, store)
    new_bytes = model_server_sizing(outcome.model_uri, store).expected_bytes
    without_old = sum(running.values()) - running[name] + new_bytes
    serve = serve_model.with_options(retries=0)
    spec = ModelServerSpec(
        model_uri=outcome.model_uri, name=name, kind=outcome.kind, smoke_question="Hello",
        slot=1, startup_timeout_s=config.serve.startup_timeout_s,
    )  # fmt: skip

    def with_budget(budget_bytes: int) -> ModelServerSpec:
        return spec.model_copy(update={"memory_budget_gb": budget_bytes / 1e9})

    # Too small even without the old server: refused, and the old server keeps serving.
    with pytest.raises(ServingError, match="not starting the new server"):
        serve(with_budget(without_old - GIB // 4), settings.servers_dir, store)
    assert status_of(settings.servers_dir, name).state == "serving"

    # Room for the new server only once the old one is gone: memory-safe order.
    result = serve(with_budget(without_old + GIB // 8), settings.servers_dir, store)
    assert result.switch is not None and result.switch.order == "stop-first"
    assert result.switch.gap_bytes > 0
    assert status_of(settings.servers_dir, name).handle.model_uri == outcome.model_uri
    assert not is_running(old)


@pytest.mark.integration
def test_logging_writes_each_models_bytes_once(twin, fresh_store):
    import psutil

    from tasks.mlflow_models import log_chat_pipeline, log_onnx_chat_model, log_onnx_prompt_model
    from tasks.onnx_storage import folder_bytes, store_onnx_folder

    me = psutil.Process()
    source = {"repo": TWIN_REPO_ID, "commit": "0123abcd"}
    generation, export = GenerationSpec(max_new_tokens=4), OnnxExportSpec(source="hub")
    onnx_dir = twin.onnx_repo_dir / PHI3_ONNX_INT4_SUBFOLDER
    slack = 8 << 20  # MLmodel, requirements, tokenizer files, the SQLite store

    from tasks.mlflow_models import check_causal_lm

    check_causal_lm(twin.model_dir)  # its transformers and torch imports (~200 MB) stay here
    before, rss_before = me.io_counters().write_chars, me.memory_info().rss
    ref = log_chat_pipeline.fn(fresh_store, "release", twin.model_dir, generation, source)
    weights = sum(p.stat().st_size for p in twin.model_dir.glob("*.safetensors"))
    # A checkpoint this big is loaded and saved by a child process, which reports its cost.
    cost = fresh_store.client().get_run(ref.run_id).data.metrics
    assert cost["logging.peak_rss_mb"] * 1e6 > 0.9 * weights
    assert me.memory_info().rss - rss_before < 0.25 * weights  # none of them stayed here
    # Linux adds a reaped child's I/O to its parent's counters: the child's writes are in here.
    written = me.io_counters().write_chars - before
    assert cost["logging.written_mb"] * 1e6 <= written <= 1.05 * weights + slack

    before = me.io_counters().write_chars
    stored = store_onnx_folder.fn(fresh_store, "release", onnx_dir, export, source)
    for log in (log_onnx_prompt_model, log_onnx_chat_model):
        log.fn(fresh_store, "release", onnx_dir, generation, export, source, stored.artifact_uri)
    assert me.io_counters().write_chars - before <= 1.05 * folder_bytes(onnx_dir) + slack
    # Stored once: a second store of the same folder finds the first.
    again = store_onnx_folder.fn(fresh_store, "release", onnx_dir, export, source)
    assert again.reused and again.artifact_uri == stored.artifact_uri


@pytest.mark.e2e
def test_validating_a_new_version_that_cannot_fit_stops_its_old_server_first(twin_release):
    from tasks.mlflow_models import log_onnx_prompt_model
    from tasks.serving import (
        make_room_for_model,
        model_server_sizing,
        running_servers_footprint,
        status_of,
    )

    settings, config, report = twin_release
    store = ModelStore.from_settings(settings)
    outcome = next(o for o in report.outcomes if o.kind is WrapperKind.CHAT_TRANSFORMERS)
    name = outcome.registered_model
    # Registered (so validated) already: a re-run loads nothing and stops nothing.
    assert make_room_for_model(outcome.model_uri, name, settings.servers_dir,
                               store, 0.001).plan is None  # fmt: skip
    assert status_of(settings.servers_dir, name).state == "serving"

    onnx = next(o for o in report.outcomes if o.kind is WrapperKind.PROMPT_ONNX)
    conf = _mlmodel(settings, onnx.model_uri)["flavors"]["python_function"]["config"]
    twin_dir = Path(conf["onnx_model_uri"].removeprefix("file://"))
    new = log_onnx_prompt_model.fn(
        store, "release", twin_dir, GenerationSpec(max_new_tokens=4),
        OnnxExportSpec(source="hub"), {"repo": TWIN_REPO_ID, "commit": "feedbeef"},
        conf["onnx_model_uri"],
    )  # fmt: skip
    running = running_servers_footprint(settings.servers_dir, store)
    need = model_server_sizing(new.model_uri, store).expected_bytes
    room = make_room_for_model(
        new.model_uri, name, settings.servers_dir, store,
        (sum(running.values()) - running[name] + need + GIB // 8) / 1e9,
    )  # fmt: skip
    assert room.plan is not None and room.plan.order == "stop-first"
    assert room.stopped is not None and room.stopped.name == name
    assert status_of(settings.servers_dir, name).state == "absent"


@pytest.mark.e2e
def test_validation_loads_each_wrapper_in_a_fresh_process(twin_release):
    from tasks.serving import model_files_bytes

    settings, _, report = twin_release
    store = ModelStore.from_settings(settings)
    client = store.client()
    for outcome in report.outcomes:
        model = client.get_logged_model(outcome.model_uri.removeprefix("models:/"))
        peak_mb = client.get_run(model.source_run_id).data.metrics["validation.peak_rss_mb"]
        # The process that loaded the model held it (and its memory went back when it exited).
        assert peak_mb * 1e6 > 0.5 * model_files_bytes(outcome.model_uri, store), outcome.kind


@pytest.mark.e2e
def test_the_fit_check_before_promoting_measures_without_stopping(twin_release):
    from prefect.logging import disable_run_logger

    from tasks.serving import check_serving_fits, status_of

    settings, _, report = twin_release
    store = ModelStore.from_settings(settings)
    outcome = next(o for o in report.outcomes if o.kind is WrapperKind.PROMPT_ONNX)
    name = outcome.registered_model
    served = status_of(settings.servers_dir, name).handle.model_uri
    other = next(u for u in (outcome.model_uri, f"models:/{name}/1") if u != served)
    with disable_run_logger():
        # Served already: nothing to start, whatever the budget.
        assert check_serving_fits.fn(served, name, settings.servers_dir, store, 0.001) is None
        plan = check_serving_fits.fn(other, name, settings.servers_dir, store, 0.001)
    assert plan is not None and plan.order == "refuse"
    assert status_of(settings.servers_dir, name).state == "serving"  # only measured


@pytest.mark.e2e
def test_served_models_are_sized_from_their_stored_files_and_settings(twin_release):
    from tasks.serving import model_files_bytes, model_server_sizing, running_servers_footprint

    settings, config, report = twin_release
    store = ModelStore.from_settings(settings)
    generation = config.generation
    footprint = running_servers_footprint(settings.servers_dir, store)
    for outcome in report.outcomes:
        sizing = model_server_sizing(outcome.model_uri, store)
        assert sizing.files_bytes == model_files_bytes(outcome.model_uri, store)
        if outcome.kind is WrapperKind.CHAT_TRANSFORMERS:
            assert sizing.runtime == "transformers"
            # bf16 (the checkpoint's dtype), one layer, the full context of 4096.
            assert (sizing.kv_bytes_per_token, sizing.kv_turns) == (12_288, 1)
            assert sizing.kv_tokens_per_turn == 4096
        else:
            assert sizing.runtime == "onnxruntime-genai"
            # fp32, read from the graph's inputs; the engine settings from the model_config.
            assert sizing.kv_bytes_per_token == 24_576
            assert sizing.kv_turns == generation.engine_max_batch_size
            assert sizing.kv_tokens_per_turn == generation.engine_token_budget
        # An idle server has not reserved its batch's cache: counted at its sizing. (Earlier
        # tests of this module stop some servers.)
        if outcome.registered_model in footprint:
            assert footprint[outcome.registered_model] >= sizing.expected_bytes
    assert footprint.keys() & {o.registered_model for o in report.outcomes}


@pytest.mark.e2e
def test_a_version_whose_server_cannot_fit_is_not_promoted(twin_release, monkeypatch):
    """Production and the served model never diverge: refused before promoting, not after."""
    import flows.release
    from flows.release import ReleaseMemoryError, release
    from tasks.registry import champion_version
    from tasks.serving import check_serving_fits, status_of

    settings, config, _ = twin_release
    store = ModelStore.from_settings(settings)
    names = {kind: config.registry.model_name(kind) for kind in config.serve.kinds}
    tight = names[WrapperKind.CHAT_TRANSFORMERS]

    def with_no_room_for_transformers(model_uri, name, servers_dir, store, budget_gb=None):
        budget_gb = 0.001 if name == tight else budget_gb
        return check_serving_fits.fn(model_uri, name, servers_dir, store, budget_gb)

    monkeypatch.setattr(flows.release, "check_serving_fits", with_no_room_for_transformers)
    before = {kind: champion_version(store, name) for kind, name in names.items()}
    # Another token budget: new wrappers, so new versions of every kind.
    changed = config.model_copy(update={"generation": GenerationSpec(max_new_tokens=3)})
    with pytest.raises(ReleaseMemoryError, match=f"{tight} v2 not promoted.*not starting"):
        release(changed)

    after = {kind: champion_version(store, name) for kind, name in names.items()}
    assert after[WrapperKind.CHAT_TRANSFORMERS] == before[WrapperKind.CHAT_TRANSFORMERS]
    assert after[WrapperKind.PROMPT_ONNX].version > before[WrapperKind.PROMPT_ONNX].version
    for kind, name in names.items():
        status = status_of(settings.servers_dir, name)
        assert status.state == "serving", kind
        assert status.handle.model_uri == after[kind].uri, kind
