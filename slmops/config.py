"""Typed configuration: flow parameter models (what operators choose) and settings (where things are).

Parameter models are frozen and forbid unknown keys, so a typo in a deployment file is an error,
not a silently ignored field. Connection settings come from `Settings.from_env`, called inside a
flow, never at import.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

PHI3_REPO_ID = "microsoft/Phi-3-mini-4k-instruct"
PHI3_ONNX_REPO_ID = "microsoft/Phi-3-mini-4k-instruct-onnx"
PHI3_ONNX_INT4_SUBFOLDER = "cpu_and_mobile/cpu-int4-rtn-block-32-acc-level-4"


class Spec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class WrapperKind(StrEnum):
    """The MLflow models a release builds from one snapshot."""

    CHAT_TRANSFORMERS = "chat-transformers"  # transformers pipeline, task llm/v1/chat
    PROMPT_ONNX = "prompt-onnx"  # pyfunc on onnxruntime-genai, {prompt} -> string
    CHAT_ONNX = "chat-onnx"  # pyfunc on onnxruntime-genai, llm/v1/chat shape


class HubSpec(Spec):
    """Which model to fetch, and from where.

    `source="embedded"` builds the tiny offline Phi-3 and serves it on a loopback fake hub, so
    the real `huggingface_hub` download path runs without internet.
    """

    source: Literal["embedded", "hub"] = "embedded"
    repo_id: str = PHI3_REPO_ID
    revision: str = "main"
    onnx_repo_id: str = PHI3_ONNX_REPO_ID
    onnx_revision: str = "main"
    onnx_subfolder: str = PHI3_ONNX_INT4_SUBFOLDER
    # Weights-only download: skip the remote code and docs the pipeline doesn't need.
    allow_patterns: tuple[str, ...] = (
        "*.json",
        "*.safetensors",
        "tokenizer.model",
    )

    @field_validator("repo_id", "onnx_repo_id")
    @classmethod
    def _is_repo_id(cls, value: str) -> str:
        parts = value.split("/")
        if len(parts) != 2 or not all(parts):
            raise ValueError(f"repo id must look like 'owner/name', got {value!r}")
        return value


class OnnxExportSpec(Spec):
    """How the onnxruntime-genai model is obtained: the hub's ONNX release or a local build."""

    source: Literal["build", "hub"] = "build"
    precision: Literal["int4", "fp32"] = "int4"
    execution_provider: Literal["cpu"] = "cpu"
    block_size: Literal[16, 32, 64, 128, 256] = 32
    accuracy_level: Literal[0, 1, 2, 3, 4] = 4

    def builder_args(self) -> list[str]:
        """Arguments for `python -m onnxruntime_genai.models.builder` after -i/-o."""
        args = ["-p", self.precision, "-e", self.execution_provider]
        if self.precision == "int4":
            args += [
                "--extra_options",
                f"accuracy_level={self.accuracy_level}",
                f"block_size={self.block_size}",
            ]
        return args


class GenerationSpec(Spec):
    """Generation options baked into the wrappers (requests may override per call)."""

    max_new_tokens: int = Field(default=64, ge=1, le=2048)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)  # 0 = greedy, reproducible

    @property
    def do_sample(self) -> bool:
        return self.temperature > 0.0


class RegistrySpec(Spec):
    """Registered model names, one per wrapper kind."""

    name_prefix: str = Field(default="phi3-mini", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

    def model_name(self, kind: WrapperKind) -> str:
        return f"{self.name_prefix}-{kind.value}"


class ServeSpec(Spec):
    """Which Production models are served, and where."""

    enabled: bool = True
    host: str = "127.0.0.1"
    # All three, so both runtimes answer OpenAI chat requests behind the front door.
    kinds: tuple[WrapperKind, ...] = tuple(WrapperKind)
    base_port: int | None = Field(default=None, ge=1024, le=65535)  # None: pick free ports
    startup_timeout_s: float = Field(default=180.0, gt=0)
    # OpenAI-compatible `/v1/chat/completions` in front of the served chat models.
    front_door: bool = True
    # None: a free port, then the same one on every restart while it stays free.
    front_door_port: int | None = Field(default=None, ge=1024, le=65535)
    # Most memory the model servers may hold together (GB, 1e9 bytes). Before a server starts, the
    # running servers' RSS plus the new model's size is checked against it (and against the
    # available memory): a blue/green switch that cannot fit stops the old server first.
    # None: only the machine's available memory limits it.
    memory_budget_gb: float | None = Field(default=None, gt=0)
    # Longest a server works on one request before answering 504 (MLflow's default: 60 s, too
    # short for Phi-3-mini in bf16 on a small CPU, see README "Releasing the real Phi-3-mini").
    request_timeout_s: float = Field(default=60.0, gt=0)


class ReleaseConfig(Spec):
    """Parameters of the release flow (rendered as the Prefect UI form)."""

    hub: HubSpec = HubSpec()
    onnx: OnnxExportSpec = OnnxExportSpec()
    generation: GenerationSpec = GenerationSpec()
    registry: RegistrySpec = RegistrySpec()
    serve: ServeSpec = ServeSpec()
    promote: bool = True
    # Greedy transformers vs onnxruntime-genai fp32, token by token (needs an fp32 export: cheap
    # for the tiny model, ~15 GB for the real Phi-3-mini).
    runtime_parity: bool = True


class Settings(Spec):
    """Where things live and the secrets to reach them; built from the environment in a flow."""

    home: Path
    tracking_uri: str
    hf_token: SecretStr | None = None
    hf_endpoint: str | None = None
    # Where the embedded tiny Phi-3 is built; shareable between homes (it is deterministic).
    embedded_cache: Path | None = None

    @property
    def cache_dir(self) -> Path:
        return self.home / "cache"

    @property
    def embedded_cache_dir(self) -> Path:
        return self.embedded_cache or self.cache_dir / "embedded"

    @property
    def servers_dir(self) -> Path:
        return self.home / "servers"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        home = Path(env.get("SLMOPS_HOME", ".slmops")).resolve()
        tracking_uri = env.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home / 'mlflow.db'}"
        token = env.get("HF_TOKEN")
        return cls(
            home=home,
            tracking_uri=tracking_uri,
            hf_token=SecretStr(token) if token else None,
            hf_endpoint=env.get("HF_ENDPOINT") or None,
            embedded_cache=Path(env["SLMOPS_EMBEDDED_CACHE"])
            if env.get("SLMOPS_EMBEDDED_CACHE")
            else None,
        )


class RollbackConfig(Spec):
    """Parameters of the rollback flow: which model goes back to which version, and why."""

    kind: WrapperKind = WrapperKind.CHAT_TRANSFORMERS
    version: int = Field(ge=1)
    reason: str = Field(min_length=3)
    registry: RegistrySpec = RegistrySpec()
    serve: ServeSpec = ServeSpec()


class ServeFlowConfig(Spec):
    """Parameters of the serve flow: start (or repair), stop, or report the model servers."""

    action: Literal["start", "stop", "status"] = "status"
    registry: RegistrySpec = RegistrySpec()
    serve: ServeSpec = ServeSpec()
