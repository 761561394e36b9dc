"""Typed configuration: flow parameter models (what operators choose) and settings (where things are).

Parameter models are frozen and forbid unknown keys, so a typo in a deployment file is an error,
not a silently ignored field. Connection settings come from `Settings.from_env`, called inside a
flow, never at import.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

PHI3_REPO_ID = "microsoft/Phi-3-mini-4k-instruct"
PHI3_ONNX_REPO_ID = "microsoft/Phi-3-mini-4k-instruct-onnx"
PHI3_ONNX_INT4_SUBFOLDER = "cpu_and_mobile/cpu-int4-rtn-block-32-acc-level-4"
# The embedded default has its own identity: its releases must never be mistaken for (or
# registered over) releases of the real model.
TINY_PHI3_REPO_ID = "slmops/tiny-phi3"
TINY_PHI3_ONNX_REPO_ID = "slmops/tiny-phi3-onnx"
TINY_PHI3_NAME_PREFIX = "tiny-phi3"
EMBEDDED_REPO_IDS = frozenset({TINY_PHI3_REPO_ID, TINY_PHI3_ONNX_REPO_ID})


# MLflow's scoring server answers 504 past this many seconds on one request (its own default).
DEFAULT_REQUEST_TIMEOUT_S = 60.0


class Spec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class WrapperKind(StrEnum):
    """The MLflow models a release builds from one snapshot."""

    CHAT_TRANSFORMERS = "chat-transformers"  # transformers pipeline, task llm/v1/chat
    PROMPT_ONNX = "prompt-onnx"  # pyfunc on onnxruntime-genai, {prompt} -> string
    CHAT_ONNX = "chat-onnx"  # pyfunc on onnxruntime-genai, llm/v1/chat shape


class HubSpec(Spec):
    """Which model to fetch, and from where.

    `source="embedded"` builds the tiny offline Phi-3 (repo `slmops/tiny-phi3`) and serves it
    on a loopback fake hub, so the real `huggingface_hub` download path runs without internet.
    `source="hub"` fetches e.g. microsoft/Phi-3-mini-4k-instruct (see deployments/phi3-mini.yaml).
    """

    source: Literal["embedded", "hub"] = "embedded"
    repo_id: str = TINY_PHI3_REPO_ID
    revision: str = "main"
    onnx_repo_id: str = TINY_PHI3_ONNX_REPO_ID
    onnx_revision: str = "main"
    onnx_subfolder: str = PHI3_ONNX_INT4_SUBFOLDER
    # Weights-only download: skip the remote code and docs the pipeline doesn't need.
    allow_patterns: tuple[str, ...] = (
        "*.json",
        "*.safetensors",
        "tokenizer.model",
    )
    # Transient hub faults (connection refused or cut, timeouts, 429/5xx) are retried this many
    # times, the first after `retry_backoff_s`, doubling; a wrong repo or revision never is.
    retries: int = Field(default=3, ge=0, le=10)
    retry_backoff_s: float = Field(default=2.0, ge=0.0, le=600.0)

    @field_validator("repo_id", "onnx_repo_id")
    @classmethod
    def _is_repo_id(cls, value: str) -> str:
        parts = value.split("/")
        if len(parts) != 2 or not all(parts):
            raise ValueError(f"repo id must look like 'owner/name', got {value!r}")
        return value

    @model_validator(mode="before")
    @classmethod
    def _hub_defaults_to_phi3(cls, data: Any) -> Any:
        # The defaults are the embedded repos; `source: hub` without repo ids means the real
        # Phi-3-mini, not repos that exist only embedded.
        if isinstance(data, dict) and data.get("source") == "hub":
            data = {"repo_id": PHI3_REPO_ID, "onnx_repo_id": PHI3_ONNX_REPO_ID, **data}
        return data

    @model_validator(mode="after")
    def _embedded_repos_only(self) -> HubSpec:
        # The loopback fake hub serves the embedded repos and nothing else.
        if self.source == "embedded" and not {self.repo_id, self.onnx_repo_id} <= EMBEDDED_REPO_IDS:
            raise ValueError(
                f"source 'embedded' serves only {sorted(EMBEDDED_REPO_IDS)}, not "
                f"{self.repo_id!r} / {self.onnx_repo_id!r}: use those repo ids, or source 'hub' "
                f"for a hub model such as {PHI3_REPO_ID!r}"
            )
        return self


class OnnxExportSpec(Spec):
    """How the onnxruntime-genai model is obtained: the hub's ONNX release or a local build."""

    source: Literal["build", "hub"] = "build"
    precision: Literal["int4", "fp32"] = "int4"
    execution_provider: Literal["cpu"] = "cpu"
    # The hub release's options. Measured on the full-size twin (benchmarks/results/int4_sweep,
    # 2af3968 and 5dc4d59, 2 cores): block 128 takes ~20% less per token and loads ~1 GB less, but
    # the twin's random weights cannot show what the coarser blocks cost in accuracy, so 32
    # stays until that is measured on real weights. Accuracy level 1 (fp32 compute) is 1.7-2x
    # slower per token than 4 (int8 compute).
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
    # The ONNX wrappers' shared onnxruntime-genai engine: turns generated together, and the
    # tokens (prompt + answer) one turn may reach, which also sizes each batch slot's KV cache.
    # 4 is what onnxruntime-genai configures on CPU by itself (slmops.onnx_genai_runtime), and
    # measured best of 1, 2, 4 (benchmarks.serving_engine; README "Measured").
    engine_max_batch_size: int = Field(default=4, ge=1, le=64)
    engine_token_budget: int = Field(default=2048, ge=16)
    # onnxruntime's threads per step; None: one per core the server may run on, decided where
    # the model is loaded (onnxruntime-genai's own default ran one thread on 2 cores, 1.5x
    # slower per token: slmops.onnx_genai_runtime).
    engine_threads: int | None = Field(default=None, ge=1, le=256)

    @property
    def do_sample(self) -> bool:
        return self.temperature > 0.0


class EvaluationSpec(Spec):
    """What a challenger is evaluated on before the promotion gate (`slmops.eval_sets`)."""

    # A set shipped in slmops/evalsets/ (`tiny-phi3`: what the embedded model was trained on;
    # `phi3`: facts, arithmetic and format-following for a real Phi-3), or a .jsonl path.
    eval_set: str = Field(default="tiny-phi3", min_length=1)
    # Predict the set in a fresh process, so its peak RSS is the model's own (~3 s more per
    # model for the start-up); off, memory is not measured and the gate skips that check.
    measure_memory: bool = False


class GateSpec(Spec):
    """The promotion gate: what the challenger's evaluation must show against the champion's."""

    # Share of evaluation items passed, at least (judged alone on a first release).
    min_score: float = Field(default=0.9, ge=0.0, le=1.0)
    # The challenger may score this much below the champion.
    score_tolerance: float = Field(default=0.02, ge=0.0, le=1.0)
    # p95 latency may grow by this fraction of the champion's, plus `latency_slack_s`: the
    # tiny model answers in 0.1-0.9 s per item on a busy 2-core machine (measured), so below a
    # second scheduling noise exceeds any fraction.
    latency_tolerance: float = Field(default=0.5, ge=0.0)
    latency_slack_s: float = Field(default=1.0, ge=0.0)
    # Peak RSS may grow by this fraction of the champion's (checked where both were measured).
    rss_tolerance: float = Field(default=0.2, ge=0.0)


class RegistrySpec(Spec):
    """Registered model names, one per wrapper kind."""

    name_prefix: str = Field(default=TINY_PHI3_NAME_PREFIX, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

    def model_name(self, kind: WrapperKind) -> str:
        return f"{self.name_prefix}-{kind.value}"


class ValidationSpec(Spec):
    """What validation demands beyond structure (signature, serving example, output suite)."""

    # Validation also asks the evaluation set's questions with one reference answer (exact
    # checks), whose answers must come out: true for a model that learned them (the embedded
    # tiny Phi-3 and its `tiny-phi3` set), false for a real model.
    reference_answers: bool = True
    # Load the model in a fresh process, whose memory goes back to the machine when it exits:
    # a 7.6 GB model validated in the flow process stays in its heap (11 GB RSS measured) while
    # the release starts servers. Off for small models (a process costs a few seconds).
    fresh_process: bool = False


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
    # Most memory the model servers may hold together (GB, 1e9 bytes).
    # Before a server starts (or a model is loaded to validate it), the running servers, each
    # at max(RSS, its model's files), plus the new model's size are checked against it (and
    # against the available memory): a blue/green switch that cannot fit stops the old server
    # first; one that cannot fit even then is refused, before its version is promoted.
    # None: only the machine's available memory limits it.
    memory_budget_gb: float | None = Field(default=None, gt=0)
    # Longest a server works on one request before answering 504 (MLflow's default: 60 s, too
    # short for Phi-3-mini in bf16 on a small CPU, see README "Releasing the real Phi-3-mini").
    request_timeout_s: float = Field(default=DEFAULT_REQUEST_TIMEOUT_S, gt=0)


class ModelServerSpec(Spec):
    """One model server to run: which model, under which name, where, and within what limits."""

    model_uri: str  # e.g. models:/name@champion, resolved under the serving lock
    name: str  # the registered model name; also the server's state-file name
    kind: WrapperKind
    smoke_question: str  # a new server must answer it before it takes over
    host: str = "127.0.0.1"
    base_port: int | None = Field(default=None, ge=1024, le=65535)
    slot: int = Field(default=0, ge=0)  # the blue/green port pair base_port + 2*slot + {0, 1}
    startup_timeout_s: float = Field(default=180.0, gt=0)
    request_timeout_s: float = Field(default=DEFAULT_REQUEST_TIMEOUT_S, gt=0)
    memory_budget_gb: float | None = Field(default=None, gt=0)

    @classmethod
    def from_serve(
        cls, serve: ServeSpec, model_uri: str, name: str, kind: WrapperKind, smoke_question: str
    ) -> ModelServerSpec:
        """The server of `kind` as `serve` places it (its slot is the kind's place in
        `serve.kinds`)."""
        return cls(
            model_uri=model_uri, name=name, kind=kind, smoke_question=smoke_question,
            host=serve.host, base_port=serve.base_port, slot=serve.kinds.index(kind),
            startup_timeout_s=serve.startup_timeout_s, request_timeout_s=serve.request_timeout_s,
            memory_budget_gb=serve.memory_budget_gb,
        )  # fmt: skip


class ParitySpec(Spec):
    """Runtime parity: the ONNX runtime's greedy tokens against transformers', prompt by prompt.

    A checkpoint of up to `fp32_max_weights_gb` is compared exactly: transformers in fp32 against
    an fp32 ONNX export, where any divergence is a conversion bug. A bigger one would need an
    fp32 export of twice its bf16 size (15 GB for Phi-3-mini) and transformers in fp32 (15 GB of
    memory), so its parity is what users get: the release's int4 model against transformers in
    the checkpoint's own dtype (bf16), which quantization makes diverge now and then; the share
    of greedy tokens that agree up to each prompt's first divergence must reach
    `int4_min_agreement`.
    """

    fp32_max_weights_gb: float = Field(default=2.0, gt=0)
    min_agreement: float = Field(default=0.95, ge=0.0, le=1.0)  # fp32 export vs fp32
    int4_min_agreement: float = Field(default=0.5, ge=0.0, le=1.0)  # int4 release vs bf16
    max_new_tokens: int = Field(default=32, ge=1, le=512)

    def compares_int4(self, weights_bytes: int) -> bool:
        """Whether a checkpoint of `weights_bytes` is compared through the int4 release."""
        return weights_bytes > self.fp32_max_weights_gb * 1e9


class ReleaseConfig(Spec):
    """Parameters of the release flow (rendered as the Prefect UI form)."""

    hub: HubSpec = HubSpec()
    onnx: OnnxExportSpec = OnnxExportSpec()
    generation: GenerationSpec = GenerationSpec()
    validation: ValidationSpec = ValidationSpec()
    evaluation: EvaluationSpec = EvaluationSpec()
    gate: GateSpec = GateSpec()
    registry: RegistrySpec = RegistrySpec()
    serve: ServeSpec = ServeSpec()
    # true: promote versions that pass validation and the gate; false: register only;
    # "force": promote versions that pass validation even past a failed gate, audited with
    # `promote_reason`.
    promote: bool | Literal["force"] = True
    promote_reason: str = ""
    # Greedy transformers vs onnxruntime-genai, token by token: against an fp32 export for a
    # small checkpoint, against the int4 release in bf16 for a big one (`parity`).
    runtime_parity: bool = True
    parity: ParitySpec = ParitySpec()

    @model_validator(mode="after")
    def _forcing_needs_a_reason(self) -> ReleaseConfig:
        if self.promote == "force" and len(self.promote_reason.strip()) < 3:
            raise ValueError(
                "promote: force needs a promote_reason (who decided, and why), for the audit trail"
            )
        return self

    @property
    def force_promotion(self) -> bool:
        return self.promote == "force"


def sqlite_uri(path: Path) -> str:
    """The SQLAlchemy URL of a SQLite database file (absolute, as MLflow needs it)."""
    return f"sqlite:///{Path(path).expanduser().resolve()}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URL, or None for any other store."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return None
    return Path(unquote(uri.removeprefix(prefix).split("?", 1)[0])).resolve()


class RegistryLockSpec(Spec):
    """How registry changes to one registered model are serialised across release runs.

    `file`: a lock file per model in `folder`, which serialises the processes of one host only
    (the default, with the SQLite store in SLMOPS_HOME). `prefect`: a Prefect global concurrency
    limit of one slot per model, held through the Prefect API that every worker of every host
    shares; needed as soon as two hosts use one tracking server.
    """

    kind: Literal["file", "prefect"] = "file"
    folder: Path | None = None  # `file`: where the lock files live
    timeout_s: float = Field(default=900.0, gt=0)  # longest wait for the lock
    # `prefect`: the slot is leased and renewed while held; a holder that dies (its host lost)
    # frees it when the lease runs out. Prefect's API takes 60 s at least.
    lease_s: float = Field(default=60.0, ge=60.0)

    @model_validator(mode="after")
    def _file_locks_need_a_folder(self) -> RegistryLockSpec:
        if self.kind == "file" and self.folder is None:
            raise ValueError("file locks need a folder")
        return self


class Settings(BaseSettings):
    """Where things live and the secrets to reach them; built from the environment in a flow
    (never at import), by `Settings()` or `Settings.from_env(mapping)`."""

    # Each field is read from the variable of its own name (case-insensitive), nothing else:
    # aliases would let `home` read HOME.
    model_config = SettingsConfigDict(frozen=True, extra="ignore")

    slmops_home: Path = Path(".slmops")
    mlflow_tracking_uri: str = ""  # empty: SQLite in the home folder (see `tracking_uri`)
    hf_token: SecretStr | None = None
    hf_endpoint: str | None = None
    # Where the embedded tiny Phi-3 is built; shareable between homes (it is deterministic).
    slmops_embedded_cache: Path | None = None
    # `file`: registry locks on this host's disk; `prefect`: through the Prefect API, for
    # workers on several hosts sharing one tracking server (README "Scaling out").
    slmops_registry_locks: Literal["file", "prefect"] = "file"

    @field_validator("slmops_home")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @field_validator("hf_token", "hf_endpoint", "slmops_embedded_cache", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return None if value == "" else value

    @property
    def home(self) -> Path:
        """The state folder (SLMOPS_HOME)."""
        return self.slmops_home

    @property
    def tracking_uri(self) -> str:
        return self.mlflow_tracking_uri or sqlite_uri(self.home / "mlflow.db")

    @property
    def cache_dir(self) -> Path:
        return self.home / "cache"

    @property
    def embedded_cache_dir(self) -> Path:
        return self.slmops_embedded_cache or self.cache_dir / "embedded"

    @property
    def servers_dir(self) -> Path:
        return self.home / "servers"

    @property
    def lock_dir(self) -> Path:
        return self.home / "locks"

    @property
    def registry_locks(self) -> RegistryLockSpec:
        """How this process serialises registry changes with the other release runs."""
        return RegistryLockSpec(kind=self.slmops_registry_locks, folder=self.lock_dir)

    @property
    def task_results_dir(self) -> Path:
        """Prefect's persisted task results and cache records (not ~/.prefect: see
        flows._runtime.task_results_under)."""
        return self.home / "prefect-results"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Settings from `environ` (default: the process environment)."""
        if environ is None:
            return cls()
        # Every field given explicitly: a field left out would be read from the process.
        return cls(
            **{
                name: environ.get(name.upper(), field.default)
                for name, field in cls.model_fields.items()
            }
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


class PruneConfig(Spec):
    """Parameters of the prune flow: which registered models lose the files of old versions."""

    registry: RegistrySpec = RegistrySpec()
    kinds: tuple[WrapperKind, ...] = tuple(WrapperKind)
    # Released versions (Production or Archived) kept per registered model, the newest by
    # number: after a release, the champion and the version it replaced. Production, Staging,
    # unpromoted (stage None) and aliased versions are kept beyond these.
    keep_last: int = Field(default=2, ge=1, le=1000)
    # Report what would be deleted; change nothing.
    dry_run: bool = False
    reason: str = Field(default="retention: keep the newest versions", min_length=3)
