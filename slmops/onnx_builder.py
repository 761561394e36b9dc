"""Run onnxruntime-genai's model builder on a local Hugging Face snapshot."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from slmops.config import OnnxExportSpec

GENAI_CONFIG = "genai_config.json"


class OnnxExportError(RuntimeError):
    """The model builder failed or produced no usable onnxruntime-genai folder."""


def build_onnx_model(model_dir: Path, out_dir: Path, spec: OnnxExportSpec) -> Path:
    """Convert `model_dir` into an onnxruntime-genai folder at `out_dir` (atomically).

    The builder writes into a staging folder that is renamed into place only when it holds a
    `genai_config.json`, so a failed export never leaves a half-made folder behind.
    """
    if not (model_dir / "config.json").exists():
        raise OnnxExportError(f"{model_dir} is not a Hugging Face model folder (no config.json)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    cache = Path(tempfile.mkdtemp(prefix=".builder-cache-", dir=out_dir.parent))
    try:
        cmd = [
            sys.executable, "-m", "onnxruntime_genai.models.builder",
            "-i", str(model_dir), "-o", str(staging), "-c", str(cache),
            *spec.builder_args(),
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0 or not (staging / GENAI_CONFIG).exists():
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
            raise OnnxExportError(
                f"onnxruntime-genai model builder failed on {model_dir} "
                f"(exit {proc.returncode}):\n{tail}"
            )
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
        return out_dir
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)
