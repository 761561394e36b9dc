"""Whether a new model server fits in memory beside the running ones, and in which order to switch.

A blue/green switch runs the old and the new server side by side until the new one is proven.
For Phi-3-mini that is 7.7 GB (transformers, bf16) twice, beside the other servers: more than a
24 GB machine holds, and the kernel's OOM killer then picks a victim, often the champion. So
before starting a server the release compares what the running servers may hold plus the new
model's expected size against a budget (`serve.memory_budget_gb`) and the memory available.

What a server may hold (`ServerSizing`) is its weights in memory, the process around them, and
its key-value cache at full load:
- an onnxruntime-genai server allocates each turn's cache for its whole token budget when the
  turn starts, and keeps it: `engine_max_batch_size` x `engine_token_budget` x the bytes per
  token (measured on Phi-3-mini's twin: 4 x 2048 turns grew a loaded 3.48 GB to 9.96 GB, the
  6.44 GB this counts; 1 x 2048: 1.62 GB; 4 x 512: 1.65 GB);
- transformers grows its cache as a turn goes: one turn of the model's full context is counted.
A running server is counted at the larger of its measured RSS and that size: a server whose
memory-mapped weights the kernel evicted reads small (Phi-3-mini bf16: 0.6 GB instead of 8.3)
but takes them back on its next request, and an idle ONNX server has not yet met its full load.

- it fits: blue/green (the old server answers until the new one is healthy);
- it fits only without the server it replaces: stop that one first, then start the new one (a
  gap in service for this model, reported with the numbers);
- it does not fit even then: refuse, and keep the old server.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

GIB = 1 << 30
# What `mlflow models serve` holds besides the weights and the cache (Python, MLflow, uvicorn,
# the runtime). Measured on Phi-3-mini's twin: 0.66 GB for transformers (torch included),
# ~0.4 GB for onnxruntime-genai.
SERVER_BASE_BYTES = GIB * 3 // 4
ONNX_SERVER_BASE_BYTES = GIB // 2
# Weights in memory per byte of model files. transformers maps them 1:1 (bf16 Phi-3-mini: 7.64 GB
# of files, 7.7 GB loaded); onnxruntime-genai int4 loads 1.28x its files (2.72 GB -> 3.48 GB,
# pre-packed weights). A model of unknown kind gets the old margin for one request.
TRANSFORMERS_RSS_PER_FILE_BYTE = 1.0
ONNX_RSS_PER_FILE_BYTE = 1.3
RSS_PER_WEIGHT_BYTE = 1.1
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


class ServerSizing(BaseModel):
    """What a model server may hold at full load, and where the number comes from."""

    model_config = ConfigDict(frozen=True)

    runtime: Literal["transformers", "onnxruntime-genai", "unknown"]
    files_bytes: int
    weights_bytes: int  # the files as the runtime holds them
    base_bytes: int
    kv_bytes_per_token: int = 0
    kv_turns: int = 0  # turns whose cache the server may hold at once
    kv_tokens_per_turn: int = 0

    @property
    def kv_bytes(self) -> int:
        return self.kv_bytes_per_token * self.kv_turns * self.kv_tokens_per_turn

    @property
    def expected_bytes(self) -> int:
        return self.weights_bytes + self.base_bytes + self.kv_bytes

    def describe(self) -> str:
        gib = lambda n: f"{n / GIB:.2f} GiB"  # noqa: E731
        text = f"weights {gib(self.weights_bytes)} + server {gib(self.base_bytes)}"
        if self.kv_turns:
            text += (
                f" + KV cache {gib(self.kv_bytes)} ({self.kv_turns} x {self.kv_tokens_per_turn} "
                f"tokens x {self.kv_bytes_per_token / 1024:.0f} KiB)"
            )
        return text


def kv_bytes_per_token(layers: int, kv_heads: int, head_size: int, dtype_bytes: int) -> int:
    """A key and a value vector per layer and key-value head."""
    return 2 * layers * kv_heads * head_size * dtype_bytes


def onnx_server_sizing(
    files_bytes: int,
    genai_config: dict[str, Any],
    kv_dtype_bytes: int,
    max_batch_size: int,
    token_budget: int,
) -> ServerSizing:
    """An onnxruntime-genai server: each of `max_batch_size` turns reserves its token budget
    (capped at the model's context, as `OnnxGenerator` caps it)."""
    model = genai_config["model"]
    decoder = model["decoder"]
    per_token = kv_bytes_per_token(
        int(decoder["num_hidden_layers"]),
        int(decoder.get("num_key_value_heads") or decoder["num_attention_heads"]),
        int(decoder["head_size"]),
        kv_dtype_bytes,
    )
    return ServerSizing(
        runtime="onnxruntime-genai",
        files_bytes=files_bytes,
        weights_bytes=int(files_bytes * ONNX_RSS_PER_FILE_BYTE),
        base_bytes=ONNX_SERVER_BASE_BYTES,
        kv_bytes_per_token=per_token,
        kv_turns=max_batch_size,
        kv_tokens_per_turn=min(token_budget, int(model["context_length"])),
    )


def transformers_server_sizing(files_bytes: int, hf_config: dict[str, Any]) -> ServerSizing:
    """A transformers server in the checkpoint's dtype: one turn of the full context."""
    config = hf_config.get("text_config", hf_config)  # multimodal configs nest the decoder's
    heads = int(config["num_attention_heads"])
    head_size = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    per_token = kv_bytes_per_token(
        int(config["num_hidden_layers"]),
        int(config.get("num_key_value_heads") or heads),
        head_size,
        _DTYPE_BYTES.get(dtype, 4),
    )
    return ServerSizing(
        runtime="transformers",
        files_bytes=files_bytes,
        weights_bytes=int(files_bytes * TRANSFORMERS_RSS_PER_FILE_BYTE),
        base_bytes=SERVER_BASE_BYTES,
        kv_bytes_per_token=per_token,
        kv_turns=1,
        kv_tokens_per_turn=int(config.get("max_position_embeddings") or 0),
    )


def unknown_server_sizing(files_bytes: int) -> ServerSizing:
    """A model whose runtime this cannot read: its files plus a margin for one request."""
    return ServerSizing(
        runtime="unknown",
        files_bytes=files_bytes,
        weights_bytes=int(files_bytes * RSS_PER_WEIGHT_BYTE),
        base_bytes=SERVER_BASE_BYTES,
    )


SwitchOrder = Literal["blue-green", "stop-first", "refuse"]


class SwitchPlan(BaseModel):
    """How to replace a server, and why."""

    model_config = ConfigDict(frozen=True)

    order: SwitchOrder
    # Every running model server (and the front door), each at max(measured RSS, its sizing).
    running_bytes: int
    replaced_bytes: int  # the server being replaced, counted the same way (part of running_bytes)
    new_bytes: int  # expected RSS of the new server
    limit_bytes: int  # min(budget, what the machine can give: available + measured RSS)
    gap_bytes: int  # how far blue/green is over the limit (0 when it fits)
    new_sizing: ServerSizing | None = None  # where new_bytes comes from

    def describe(self) -> str:
        gib = lambda n: f"{n / GIB:.1f} GiB"  # noqa: E731
        sizing = f" ({self.new_sizing.describe()})" if self.new_sizing else ""
        side_by_side = self.running_bytes + self.new_bytes
        base = (
            f"running servers {gib(self.running_bytes)} + new server "
            f"~{gib(self.new_bytes)}{sizing} = "
            f"{gib(side_by_side)} against a limit of {gib(self.limit_bytes)}"
        )
        if self.order == "blue-green":
            return f"blue/green switch: {base}"
        if self.order == "stop-first":
            return (
                f"stopping the old server ({gib(self.replaced_bytes)}) before starting the new "
                f"one, a gap in service: {base}, {gib(self.gap_bytes)} over"
            )
        return (
            f"not starting the new server: {base}; even without the old server "
            f"({gib(self.replaced_bytes)}) it is "
            f"{gib(side_by_side - self.replaced_bytes - self.limit_bytes)} over"
        )


def plan_switch(
    *,
    running_bytes: int,
    replaced_bytes: int,
    new_bytes: int,
    available_bytes: int,
    budget_bytes: int | None,
    measured_bytes: int | None = None,
    new_sizing: ServerSizing | None = None,
) -> SwitchPlan:
    """Pick the switch order for a new server of `new_bytes` (all sizes in bytes).

    Args:
        running_bytes: what the running servers may hold, the replaced one included: each at
            max(measured RSS, its `ServerSizing`).
        replaced_bytes: the same for the server the new one replaces (0 if none).
        new_bytes: what the new server may hold (`ServerSizing.expected_bytes`).
        available_bytes: the machine's available memory now.
        budget_bytes: most the servers may hold together (None: only what the machine has).
        measured_bytes: the running servers' measured RSS (default: `running_bytes`).
        new_sizing: how `new_bytes` was sized, for the plan's description.
    """
    # What the machine can give the servers: what they hold now plus what is still available
    # (evicted weights are in `available`: counting them in `running_bytes` too would count
    # the same memory twice).
    held = running_bytes if measured_bytes is None else measured_bytes
    limit = held + available_bytes
    if budget_bytes is not None:
        limit = min(limit, budget_bytes)
    side_by_side = running_bytes + new_bytes
    if side_by_side <= limit:
        order: SwitchOrder = "blue-green"
    elif replaced_bytes and side_by_side - replaced_bytes <= limit:
        order = "stop-first"
    else:
        order = "refuse"
    return SwitchPlan(
        order=order,
        running_bytes=running_bytes,
        replaced_bytes=replaced_bytes,
        new_bytes=new_bytes,
        limit_bytes=limit,
        gap_bytes=max(0, side_by_side - limit),
        new_sizing=new_sizing,
    )
