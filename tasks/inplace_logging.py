"""Log a transformers model by saving it straight into its place in a local artifact store.

`mlflow.transformers.log_model` saves the model into a temporary folder and then copies that
folder into the artifact store: every byte of the weights is written twice (2 x 7.6 GB per
release for Phi-3-mini, plus 7.6 GB of temporary disk). With MLflow 3's public LoggedModel API
the same model can be written once: `initialize_logged_model` creates the LoggedModel and its
artifact location, `mlflow.transformers.save_model` writes the flavor there, and
`finalize_logged_model` marks it READY; the run lists it as an output, as `log_model` does.

Only for a local artifact store (`file:` locations); any other store goes through `log_model`.

A checkpoint of `CHILD_PROCESS_MIN_BYTES` or more is loaded and saved by a child process
(`python -m tasks.inplace_logging`): the memory its weights took goes back to the machine when
the child exits. Loaded in the flow's process, Phi-3-mini's bf16 weights left it holding
8.7 GiB after logging (freed to Python, kept by the allocator), memory the model servers need.
MLflow's own way to log a checkpoint without loading it (`transformers_model=<path>`) fails
with transformers 5 in MLflow 3.17.2 (`build_flavor_config_from_local_checkpoint` reads
`check_task(...)["impl"].__name__`, now a string).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import mlflow
from mlflow import MlflowClient
from mlflow.entities import LoggedModelOutput, Param
from mlflow.models import Model

from slmops.errors import ExplainedError
from slmops.onnx_builder import checkpoint_bytes
from slmops.processes import checkout_env, own_peak_rss_mb

# Smaller checkpoints are saved in-process: the child's start-up (~5 s of imports) would cost
# more than their weights keep.
CHILD_PROCESS_MIN_BYTES = 256 << 20
# The Model fields a child needs to write the MLmodel of the LoggedModel created here.
_MODEL_FIELDS = ("artifact_path", "model_uuid", "run_id", "model_id")


class ModelSavingError(ExplainedError):
    """The child process that saves a transformers model failed."""


def load_chat_pipeline(snapshot_dir: Path) -> Any:
    """The snapshot as a transformers text-generation pipeline, in the checkpoint's dtype."""
    import transformers

    # add_bos_token=False: the tokenizer config says so, but transformers 5 keeps the BOS of
    # tokenizer.json's post-processor unless told explicitly. With a BOS, MLflow counts it as a
    # completion token (usage off by one, finish_reason "stop" at the length limit), and the
    # prompts differ from what onnxruntime-genai's tokenizer produces.
    tokenizer = transformers.AutoTokenizer.from_pretrained(snapshot_dir, add_bos_token=False)
    # dtype="auto": the checkpoint's own dtype (bf16 for Phi-3), not an fp32 copy of it.
    model = transformers.AutoModelForCausalLM.from_pretrained(snapshot_dir, dtype="auto")
    return transformers.pipeline("text-generation", model=model, tokenizer=tokenizer)


def save_chat_pipeline(
    snapshot_dir: Path, target: Path, mlflow_model: Model, save_kwargs: Mapping[str, Any]
) -> dict[str, float]:
    """`mlflow.transformers.save_model` of the snapshot's pipeline into `target`.

    Returns what the saving cost (`written_mb`, `peak_rss_mb`) when it ran in a child process,
    else nothing.
    """
    if checkpoint_bytes(snapshot_dir) < CHILD_PROCESS_MIN_BYTES:
        mlflow.transformers.save_model(
            transformers_model=load_chat_pipeline(snapshot_dir), path=str(target),
            mlflow_model=mlflow_model, **save_kwargs,
        )  # fmt: skip
        return {}
    job = {
        "snapshot_dir": str(snapshot_dir),
        "target": str(target),
        "model": {field: getattr(mlflow_model, field) for field in _MODEL_FIELDS},
        "save_kwargs": dict(save_kwargs),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "tasks.inplace_logging"], input=json.dumps(job),
        capture_output=True, text=True, env=checkout_env(), check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise ModelSavingError(
            f"saving the transformers model of {snapshot_dir} failed in its child process "
            f"(exit {proc.returncode}):\n{tail}"
        )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _save_in_this_process() -> None:
    """The child's side of `save_chat_pipeline`: the job on stdin, its cost on stdout."""
    job = json.loads(sys.stdin.read())
    save_kwargs = dict(job["save_kwargs"])
    mlflow.transformers.save_model(
        transformers_model=load_chat_pipeline(Path(job["snapshot_dir"])), path=job["target"],
        mlflow_model=Model(**job["model"]), **save_kwargs,
    )  # fmt: skip
    with open("/proc/self/io") as io:
        written = int(next(line for line in io if line.startswith("wchar:")).split()[1])
    print(json.dumps({"written_mb": written / 1e6, "peak_rss_mb": own_peak_rss_mb()}))


def local_artifact_dir(artifact_location: str) -> Path | None:
    """The folder of a `file:` (or plain path) artifact location, else None."""
    parsed = urlparse(artifact_location)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme == "" and artifact_location.startswith("/"):
        return Path(artifact_location)
    return None


def log_transformers_in_place(
    *,
    run_id: str,
    name: str,
    tags: Mapping[str, str],
    snapshot_dir: Path,
    save_kwargs: Mapping[str, Any],
) -> Any:
    """`mlflow.transformers.log_model(name=..., transformers_model=<the snapshot's pipeline>,
    **save_kwargs)` writing each byte once.

    What saving in a child process cost is logged on the run (`logging.written_mb`,
    `logging.peak_rss_mb`). Returns an object with `model_uri` and `model_id`, like
    `log_model`'s ModelInfo.
    """
    client = MlflowClient()
    # As `log_model` does: the model config becomes run params, and the model carries the run's.
    model_config = dict(save_kwargs.get("model_config") or {})
    if model_config:
        client.log_batch(run_id, params=[Param(k, str(v)) for k, v in model_config.items()])
    params = {k: str(v) for k, v in client.get_run(run_id).data.params.items()}
    model = mlflow.initialize_logged_model(
        name=name, source_run_id=run_id, tags=dict(tags), params=params
    )
    target = local_artifact_dir(model.artifact_location)
    if target is None:  # a remote store: the copy is an upload anyway
        mlflow.finalize_logged_model(model.model_id, "FAILED")
        client.delete_logged_model(model.model_id)
        return mlflow.transformers.log_model(
            name=name, tags=dict(tags), transformers_model=load_chat_pipeline(snapshot_dir),
            **save_kwargs,
        )  # fmt: skip
    try:
        if target.exists() and not any(target.iterdir()):
            target.rmdir()  # save_model wants to create the folder itself
        mlflow_model = Model(
            artifact_path=model.artifact_location,
            model_uuid=model.model_id,
            run_id=run_id,
            model_id=model.model_id,
        )
        cost = save_chat_pipeline(snapshot_dir, target, mlflow_model, save_kwargs)
        if cost:
            mlflow.log_metrics({f"logging.{k}": v for k, v in cost.items()}, run_id=run_id)
        client.log_outputs(run_id=run_id, models=[LoggedModelOutput(model.model_id, step=0)])
        mlflow.finalize_logged_model(model.model_id, "READY")
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        mlflow.finalize_logged_model(model.model_id, "FAILED")
        raise
    return InPlaceModelInfo(model_id=model.model_id, model_uri=f"models:/{model.model_id}")


@dataclass(frozen=True)
class InPlaceModelInfo:
    """The part of `log_model`'s ModelInfo the tasks use."""

    model_id: str
    model_uri: str


if __name__ == "__main__":
    _save_in_this_process()
