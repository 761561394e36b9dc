"""Whether a new model server fits in memory beside the running ones, and in which order to switch.

A blue/green switch runs the old and the new server side by side until the new one is proven.
For Phi-3-mini that is 7.7 GB (transformers, bf16) twice, beside the other servers: more than a
24 GB machine holds, and the kernel's OOM killer then picks a victim, often the champion. So
before starting a server the release compares what the running servers may hold plus the new
model's expected size against a budget (`serve.memory_budget_gb`) and the memory available.
A running server is counted at the larger of its measured RSS and its model's files: a server
whose memory-mapped weights the kernel evicted reads small (Phi-3-mini bf16: 0.6 GB instead
of 8.3) but takes them back on its next request.

- it fits: blue/green (the old server answers until the new one is healthy);
- it fits only without the server it replaces: stop that one first, then start the new one (a
  gap in service for this model, reported with the numbers);
- it does not fit even then: refuse, and keep the old server.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

GIB = 1 << 30
# What `mlflow models serve` holds besides the weights (Python, MLflow, uvicorn, the runtime).
SERVER_BASE_BYTES = GIB * 3 // 4
# Served RSS per byte of stored weights: both runtimes map the weights about 1:1 (measured on
# Phi-3-mini's shapes: transformers bf16 7.7 GB for 7.64 GB, onnxruntime-genai int4 3.3 GB for
# 2.72 GB); the margin covers the KV cache and activations of one request.
RSS_PER_WEIGHT_BYTE = 1.1

SwitchOrder = Literal["blue-green", "stop-first", "refuse"]


class SwitchPlan(BaseModel):
    """How to replace a server, and why."""

    model_config = ConfigDict(frozen=True)

    order: SwitchOrder
    # Every running model server (and the front door), each at max(measured RSS, model files).
    running_bytes: int
    replaced_bytes: int  # the server being replaced, counted the same way (part of running_bytes)
    new_bytes: int  # expected RSS of the new server
    limit_bytes: int  # min(budget, what the machine can give: available + measured RSS)
    gap_bytes: int  # how far blue/green is over the limit (0 when it fits)

    def describe(self) -> str:
        gib = lambda n: f"{n / GIB:.1f} GiB"  # noqa: E731
        side_by_side = self.running_bytes + self.new_bytes
        base = (
            f"running servers {gib(self.running_bytes)} + new server "
            f"~{gib(self.new_bytes)} = "
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


def expected_server_bytes(weights_bytes: int) -> int:
    """Expected RSS of `mlflow models serve` for a model whose files hold `weights_bytes`."""
    return int(weights_bytes * RSS_PER_WEIGHT_BYTE) + SERVER_BASE_BYTES


def plan_switch(
    *,
    running_bytes: int,
    replaced_bytes: int,
    new_bytes: int,
    available_bytes: int,
    budget_bytes: int | None,
    measured_bytes: int | None = None,
) -> SwitchPlan:
    """Pick the switch order for a new server of `new_bytes` (all sizes in bytes).

    Args:
        running_bytes: what the running servers may hold, the replaced one included: each at
            max(measured RSS, its model's files).
        replaced_bytes: the same for the server the new one replaces (0 if none).
        new_bytes: the new server's expected RSS (`expected_server_bytes`).
        available_bytes: the machine's available memory now.
        budget_bytes: most the servers may hold together (None: only what the machine has).
        measured_bytes: the running servers' measured RSS (default: `running_bytes`).
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
    )
