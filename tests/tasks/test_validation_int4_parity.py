"""Runtime parity without an fp32 export: a big checkpoint is compared through its int4 release."""

from __future__ import annotations

from pathlib import Path

import pytest

import flows.release as release_flow
from slmops.config import ParitySpec, ReleaseConfig, Settings, WrapperKind
from slmops.refs import LoggedModelRef, SnapshotRef
from tasks.validation import compare_runtimes


def _snapshot(folder: Path, weights_bytes: int) -> SnapshotRef:
    folder.mkdir()
    with open(folder / "model-00001-of-00001.safetensors", "wb") as f:
        f.truncate(weights_bytes)  # sparse: no disk used
    return SnapshotRef(repo_id="o/m", revision="main", commit="a" * 40, path=folder, files=())


@pytest.mark.unit
@pytest.mark.parametrize(("weights_gb", "int4"), [(0.5, False), (2.0, False), (7.6, True)])
def test_a_big_checkpoint_is_compared_through_its_int4_release_without_an_fp32_export(
    tmp_path, monkeypatch, weights_gb, int4
):
    calls: list[tuple[str, dict]] = []

    def fake_export(snapshot_dir, spec, out):
        calls.append(("export", {"precision": spec.precision}))
        return tmp_path / "fp32"

    def fake_compare(snapshot_dir, onnx_dir, **kwargs):
        calls.append(("compare", {"onnx_dir": onnx_dir, **kwargs}))
        return "report"

    monkeypatch.setattr(release_flow, "export_onnx", fake_export)
    monkeypatch.setattr(release_flow, "compare_runtimes", fake_compare)
    config = ReleaseConfig(parity=ParitySpec(int4_min_agreement=0.7, max_new_tokens=8))
    ref = LoggedModelRef(model_uri="models:/m-1", run_id="r", kind="prompt-onnx", model_id="m-1")
    report = release_flow.check_runtime_parity(
        config,
        Settings.from_env({"SLMOPS_HOME": str(tmp_path / "home")}),
        _snapshot(tmp_path / "snapshot", int(weights_gb * 1e9)),
        tmp_path / "int4",
        {WrapperKind.PROMPT_ONNX: ref},
        ["a prompt"],
    )
    assert report == "report"
    assert all(kwargs["prompts"] == ["a prompt"] for name, kwargs in calls if name == "compare")
    if int4:
        assert [name for name, _ in calls] == ["compare"]
        compared = calls[0][1]
        assert compared["onnx_dir"] == tmp_path / "int4" and compared["onnx_precision"] == "int4"
        assert compared["min_agreement"] == 0.7 and compared["max_new_tokens"] == 8
    else:
        assert calls[0] == ("export", {"precision": "fp32"})
        assert calls[1][1]["onnx_dir"] == tmp_path / "fp32"
        assert calls[1][1]["min_agreement"] == 0.95
        assert calls[1][1].get("onnx_precision", "fp32") == "fp32"


@pytest.mark.integration
def test_int4_release_against_transformers_in_the_checkpoints_dtype(
    tiny_model_dir, tiny_onnx_int4_dir, store, logged
):
    run_id = logged[WrapperKind.PROMPT_ONNX].run_id
    report = compare_runtimes.fn(
        tiny_model_dir, tiny_onnx_int4_dir, max_new_tokens=16, min_agreement=0.5,
        store=store, run_id=run_id, onnx_precision="int4",
    )  # fmt: skip
    assert (report.onnx_precision, report.reference_dtype) == ("int4", "auto")
    assert report.compared_tokens > 0 and report.tokenizer_mismatches == 0
    # The tiny model's int4 build keeps its greedy answers (measured: 1.0).
    assert report.passed and report.agreement >= 0.9, report.mismatches
    run = store.client().get_run(run_id)
    assert run.data.tags["slmops.parity.compared"] == "onnx int4 vs auto"
