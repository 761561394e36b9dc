"""onnxruntime-genai model folders: build one from a snapshot, or check the hub's ONNX release."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import INPUTS, TASK_SOURCE, CachePolicy
from prefect.context import TaskRunContext

from slmops.config import OnnxExportSpec
from slmops.onnx_builder import GENAI_CONFIG, OnnxExportError, build_onnx_model

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def validate_onnx_folder(folder: Path) -> Path:
    """`folder` if it is a loadable onnxruntime-genai model folder, else a clear OnnxExportError.

    Use it on the hub's ONNX release (`OnnxExportSpec.source == "hub"`) after fetching it: the
    folder must hold `genai_config.json`, the decoder model it names and a tokenizer.
    """
    if not folder.is_dir():
        raise OnnxExportError(f"ONNX model folder {folder} does not exist")
    config_path = folder / GENAI_CONFIG
    if not config_path.is_file():
        present = sorted(p.name for p in folder.iterdir())[:20]
        raise OnnxExportError(
            f"{folder} is not an onnxruntime-genai model folder: no {GENAI_CONFIG} "
            f"(found: {present or 'nothing'}). For the hub release, point at the precision "
            "subfolder, e.g. cpu_and_mobile/cpu-int4-rtn-block-32-acc-level-4."
        )
    try:
        config = json.loads(config_path.read_text())
        decoder = config["model"]["decoder"]["filename"]
    except (ValueError, KeyError, TypeError) as error:
        raise OnnxExportError(f"{config_path} is not a valid genai config: {error!r}") from error
    if not (folder / decoder).is_file():
        raise OnnxExportError(
            f"{folder}: {GENAI_CONFIG} names decoder {decoder!r}, which is missing"
        )
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise OnnxExportError(f"{folder} has no tokenizer (one of {', '.join(TOKENIZER_FILES)})")
    return folder


def export_dir(model_dir: Path, spec: OnnxExportSpec, out_root: Path) -> Path:
    """Where the export of `model_dir` with `spec` lives: one folder per (model_dir, spec)."""
    key = json.dumps({"model_dir": str(model_dir.resolve()), "spec": spec.model_dump(mode="json")})
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return out_root / f"onnx-{spec.precision}-{spec.execution_provider}-{digest}"


@dataclass
class WhileExportExists(CachePolicy):
    """`base`'s key while the export folder exists; no key (no caching) once it is gone.

    Otherwise a cached result would hand out the path of a folder someone has deleted.
    """

    base: CachePolicy = field(default_factory=lambda: INPUTS + TASK_SOURCE)

    def compute_key(
        self,
        task_ctx: TaskRunContext,
        inputs: dict[str, Any],
        flow_parameters: dict[str, Any],
        **kwargs: Any,
    ) -> str | None:
        out = export_dir(inputs["model_dir"], inputs["spec"], inputs["out_root"])
        if not (out / GENAI_CONFIG).is_file():
            return None
        return self.base.compute_key(task_ctx, inputs, flow_parameters, **kwargs)


EXPORT_CACHE_POLICY = WhileExportExists()


@task(cache_policy=EXPORT_CACHE_POLICY, persist_result=True)
def export_onnx(model_dir: Path, spec: OnnxExportSpec, out_root: Path) -> Path:
    """Build the onnxruntime-genai folder for `model_dir` (a content-addressed snapshot).

    No retries: the builder is deterministic, so a failed export fails again.

    Args:
        model_dir: Hugging Face snapshot folder (its path names the commit, so it is a cache key).
        spec: export options; `source` must be "build" (use `validate_onnx_folder` on the hub
            release instead).
        out_root: folder under which exports are kept, one subfolder per (model_dir, spec).
    """
    if spec.source != "build":
        raise OnnxExportError(
            f"export_onnx builds ONNX models; spec.source is {spec.source!r}: fetch the hub's "
            "ONNX release and check it with validate_onnx_folder instead"
        )
    out = export_dir(model_dir, spec, out_root)
    if (out / GENAI_CONFIG).is_file():
        return validate_onnx_folder(out)
    return validate_onnx_folder(build_onnx_model(model_dir, out, spec))
