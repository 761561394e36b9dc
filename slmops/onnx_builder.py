"""Run onnxruntime-genai's model builder on a local Hugging Face snapshot, within a memory budget.

What drives the builder's memory (onnxruntime-genai 0.18, `builders/base.py`): it loads the
checkpoint with `from_pretrained` in its own dtype; transformers maps the safetensors files, so
the bf16 weights are file-backed pages (1x the checkpoint, which the kernel can evict). For int4
on CPU, `to_nbits` then hands the whole graph to `MatMulNBitsQuantizer` as one protobuf
(`ir.to_proto(self.model)`): every weight materialised in fp32, 2x the bf16 bytes of anonymous
memory, plus the quantizer's working copies. Measured on the twin (1 and 3 layers): anonymous
RSS = 2.43x the checkpoint + 0.89 GB; at full size (7.64 GB) ~19.5 GB anonymous, 22.9 GB with
the mapped weights. No builder option changes that (fp32 is the float dtype of every CPU int4
build). Its fp32 export, though, writes each weight to disk as it is materialised: anonymous
RSS = 0.25x the checkpoint + 1.0 GB (~2.9 GB at full size).

So an int4 build runs the builder's fp32 export, then quantizes that model one weight at a time
with the same ONNX Runtime quantizer and options (`slmops.onnx_int4_streaming`; the result is
tensor-for-tensor identical to the builder's own int4 output). It needs 2x the checkpoint of
temporary disk (the fp32 model) instead of 2.5x of memory. Each step runs in a subprocess:

- before starting, a build whose predicted peak does not fit the available memory is refused
  with the numbers (`BuildMemoryError`), so nothing else on the machine is pushed out;
- while it runs, a watchdog samples the RSS of the process tree and kills it past its budget,
  or when the machine's available memory falls under a floor, with a clear error rather than
  the kernel's OOM killer choosing a victim (possibly a serving champion).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from slmops.config import OnnxExportSpec
from slmops.errors import ExplainedError
from slmops.processes import checkout_env

GENAI_CONFIG = "genai_config.json"
GIB = 1 << 30
# Peak anonymous RSS per byte of a 2-byte (bf16/fp16) checkpoint, of the builder's fp32 export
# (measured 0.25, see the module docstring), rounded up. The builder's own int4 path would be
# 2.43: what this module avoids.
PEAK_PER_CHECKPOINT_BYTE = 0.3
# The Python, torch and onnx runtime the builder holds besides the weights (measured 1.0 GB).
BUILDER_BASE_BYTES = GIB * 5 // 4
# Kill the build if the machine's available memory falls below this while it runs.
AVAILABLE_FLOOR_BYTES = GIB // 2
_POLL_S = 0.25


class OnnxExportError(ExplainedError):
    """The model builder failed or produced no usable onnxruntime-genai folder."""


class BuildMemoryError(OnnxExportError):
    """The build cannot fit in memory: refused before starting, or stopped past its budget."""


@dataclass(frozen=True)
class BuildReport:
    """What one builder run took."""

    wall_s: float
    peak_rss_bytes: int
    predicted_peak_bytes: int
    budget_bytes: int


def checkpoint_bytes(model_dir: Path) -> int:
    """Bytes of the checkpoint's weight files (safetensors, or PyTorch .bin)."""
    files = list(model_dir.glob("*.safetensors")) or list(model_dir.glob("*.bin"))
    return sum(f.stat().st_size for f in files)


def _checkpoint_dtype_bytes(model_dir: Path) -> int:
    config = json.loads((model_dir / "config.json").read_text())
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "float32")
    return 4 if dtype in ("float32", "fp32") else 2


def predicted_peak_bytes(model_dir: Path, spec: OnnxExportSpec) -> int:
    """The builder's predicted peak anonymous RSS for `model_dir` (see the module docstring).

    The mapped weight files are left out: the kernel can evict them, it cannot evict the rest.
    """
    weights = checkpoint_bytes(model_dir)
    # The factor is per byte of a 2-byte checkpoint; an fp32 one is not upcast again.
    factor = PEAK_PER_CHECKPOINT_BYTE * (2 / _checkpoint_dtype_bytes(model_dir))
    return int(weights * factor) + BUILDER_BASE_BYTES


def available_bytes() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def tree_rss(process) -> tuple[int, int]:
    """(RSS, anonymous RSS) summed over `process` (a psutil.Process) and its descendants."""
    import psutil

    rss = anon = 0
    for proc in [process, *process.children(recursive=True)]:
        try:
            info = proc.memory_info()
        except psutil.Error:
            continue
        rss += info.rss
        anon += info.rss - getattr(info, "shared", 0)  # Linux: shared = file-backed + shmem
    return rss, anon


def run_within_memory(
    cmd: list[str],
    budget_bytes: int,
    *,
    floor_bytes: int = AVAILABLE_FLOOR_BYTES,
    env: dict[str, str] | None = None,
) -> tuple[subprocess.CompletedProcess[str], int]:
    """Run `cmd`, killing its process tree past `budget_bytes` of anonymous RSS or when the
    machine's available memory falls under `floor_bytes`. Returns the completed process and the
    peak RSS sampled (file-backed pages included).

    Raises:
        BuildMemoryError: the process was stopped for memory (says how much it held).
    """
    import psutil

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env)
        watched = psutil.Process(proc.pid)
        peak, killed_for = 0, None
        stop = threading.Event()
        while proc.poll() is None:
            rss, anon = tree_rss(watched)
            peak = max(peak, rss)
            available = available_bytes()
            if anon > budget_bytes:
                killed_for = (
                    f"its anonymous RSS reached {anon / GIB:.1f} GiB, over its budget of "
                    f"{budget_bytes / GIB:.1f} GiB"
                )
            elif available < floor_bytes:
                killed_for = (
                    f"the machine's available memory fell to {available / GIB:.2f} GiB "
                    f"(floor {floor_bytes / GIB:.2f} GiB) with the builder at {rss / GIB:.1f} GiB"
                )
            if killed_for:
                for child in watched.children(recursive=True):
                    child.kill()
                proc.kill()
                proc.wait()
                raise BuildMemoryError(f"stopped the ONNX model builder: {killed_for}")
            stop.wait(_POLL_S)
        out.seek(0)
        err.seek(0)
        completed = subprocess.CompletedProcess(cmd, proc.returncode, out.read(), err.read())
    return completed, peak


def check_memory_fits(
    model_dir: Path, spec: OnnxExportSpec, budget_bytes: int | None
) -> tuple[int, int]:
    """(predicted peak, budget) for building `model_dir`; BuildMemoryError if it cannot fit.

    `budget_bytes` None: what the machine has available now, less the floor kept for others.
    """
    predicted = predicted_peak_bytes(model_dir, spec)
    available = available_bytes()
    budget = available - AVAILABLE_FLOOR_BYTES if budget_bytes is None else budget_bytes
    if predicted > budget or predicted > available:
        raise BuildMemoryError(
            f"not starting the ONNX model builder on {model_dir.name}: its predicted peak is "
            f"{predicted / GIB:.1f} GiB (for the "
            f"{checkpoint_bytes(model_dir) / GIB:.1f} GiB checkpoint), the budget is {budget / GIB:.1f} GiB and "
            f"{available / GIB:.1f} GiB is available; {(predicted - min(budget, available)) / GIB:.1f} "
            "GiB short. Stop the model servers (python -m flows.serve stop) or build on a bigger "
            "machine, or use the hub's ONNX release (onnx.source: hub)."
        )
    return predicted, budget


def _run_step(cmd: list[str], budget: int, model_dir: Path, out: Path, what: str) -> int:
    """Run one build step under the memory watchdog; its peak RSS, or OnnxExportError."""
    proc, peak = run_within_memory(cmd, budget, env=checkout_env())
    if proc.returncode != 0 or not (out / GENAI_CONFIG).exists():
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise OnnxExportError(
            f"onnxruntime-genai {what} failed on {model_dir} (exit {proc.returncode}):\n{tail}"
        )
    return peak


def check_disk_fits(model_dir: Path, spec: OnnxExportSpec, out_root: Path) -> None:
    """OnnxExportError unless `out_root` has room for the fp32 model (and the int4 one)."""
    weights = checkpoint_bytes(model_dir)
    fp32 = weights * 4 // _checkpoint_dtype_bytes(model_dir)
    needed = fp32 + (fp32 // 6 if spec.precision == "int4" else 0)
    free = shutil.disk_usage(out_root).free
    if free < needed:
        raise OnnxExportError(
            f"not enough disk to build {model_dir.name}: the fp32 export needs "
            f"{needed / GIB:.1f} GiB under {out_root}, {free / GIB:.1f} GiB is free"
        )


def build_onnx_model(
    model_dir: Path,
    out_dir: Path,
    spec: OnnxExportSpec,
    *,
    memory_budget_bytes: int | None = None,
) -> Path:
    """Convert `model_dir` into an onnxruntime-genai folder at `out_dir` (atomically).

    The builder writes into a staging folder that is renamed into place only when it holds a
    `genai_config.json`, so a failed export never leaves a half-made folder behind. It runs in
    a subprocess under a memory watchdog (see the module docstring).

    Args:
        model_dir: Hugging Face model folder.
        out_dir: where the onnxruntime-genai folder goes.
        spec: precision and quantization options.
        memory_budget_bytes: most RSS the builder may hold (default: available memory now).
    """
    build_onnx_model_measured(model_dir, out_dir, spec, memory_budget_bytes=memory_budget_bytes)
    return out_dir


def build_onnx_model_measured(
    model_dir: Path,
    out_dir: Path,
    spec: OnnxExportSpec,
    *,
    memory_budget_bytes: int | None = None,
) -> BuildReport:
    """`build_onnx_model`, returning what the build took (for benchmarks)."""
    if not (model_dir / "config.json").exists():
        raise OnnxExportError(f"{model_dir} is not a Hugging Face model folder (no config.json)")
    predicted, budget = check_memory_fits(model_dir, spec, memory_budget_bytes)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    cache = Path(tempfile.mkdtemp(prefix=".builder-cache-", dir=out_dir.parent))
    started = time.monotonic()
    fp32_dir = staging if spec.precision == "fp32" else staging.with_name(staging.name + "-fp32")
    try:
        check_disk_fits(model_dir, spec, out_dir.parent)
        builder = [
            sys.executable, "-m", "onnxruntime_genai.models.builder",
            "-i", str(model_dir), "-o", str(fp32_dir), "-c", str(cache),
            "-p", "fp32", "-e", spec.execution_provider,
        ]  # fmt: skip
        peak = _run_step(builder, budget, model_dir, fp32_dir, "model builder (fp32 export)")
        if spec.precision == "int4":
            quantize = [
                sys.executable, "-m", "slmops.onnx_int4_streaming", str(fp32_dir), str(staging),
                "--block-size", str(spec.block_size),
                "--accuracy-level", str(spec.accuracy_level),
            ]  # fmt: skip
            peak = max(peak, _run_step(quantize, budget, model_dir, staging, "int4 quantizer"))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
        return BuildReport(
            wall_s=time.monotonic() - started,
            peak_rss_bytes=peak,
            predicted_peak_bytes=predicted,
            budget_bytes=budget,
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(fp32_dir, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)
