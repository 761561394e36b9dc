"""Start (or repair), stop, or report the `mlflow models serve` processes of the Production models."""

from __future__ import annotations

import json

from prefect import flow, get_run_logger

from slmops.config import ServeFlowConfig, Settings
from slmops.tiny_model import TRAINED_ANSWERS
from tasks.registry import champion_version
from tasks.reporting import publish_table
from tasks.serving import (
    ServingError,
    describe,
    front_door_status,
    serve_front_door,
    serve_model,
    served_names,
    status_of,
    stop_front_door,
    stop_model_server,
)

SMOKE_QUESTION = next(iter(TRAINED_ANSWERS))


@flow(name="serve", flow_run_name="serve-{config.action}")
def serve(config: ServeFlowConfig = ServeFlowConfig()) -> list[dict]:
    """Manage the model servers of the Production (champion) versions.

    Args:
        config: `action` is `start` (serve each champion; a dead or stale server is replaced),
            `stop` (stop every server) or `status` (report only); `registry` names the models;
            `serve` gives the kinds, host and ports, and whether the OpenAI-compatible front
            door (`/v1/chat/completions` for the chat models) runs in front of them.
    """
    settings = Settings.from_env()
    logger = get_run_logger()
    rows = []
    for slot, kind in enumerate(config.serve.kinds):
        name = config.registry.model_name(kind)
        if config.action == "stop":
            status = stop_model_server(settings.servers_dir, name)
        elif config.action == "start":
            champion = champion_version(settings.tracking_uri, name)
            if champion is None:
                raise ServingError(
                    f"{name} has no champion version to serve; run the release flow first"
                )
            serve_model(
                f"models:/{name}@champion", name, kind, config.serve.host, config.serve.base_port, slot,
                settings.servers_dir, settings.tracking_uri, config.serve.startup_timeout_s,
                SMOKE_QUESTION, config.serve.memory_budget_gb,
                config.serve.request_timeout_s,
            )  # fmt: skip
            status = status_of(settings.servers_dir, name)
        else:
            status = status_of(settings.servers_dir, name)
        rows.append(describe(status))
        logger.info("%s: %s %s", name, status.state, rows[-1]["url"])
    # Servers of kinds this run was not asked about (started with another `serve.kinds`) are
    # still stopped and reported: `stop` means every server.
    for name in set(served_names(settings.servers_dir)) - {r["name"] for r in rows}:
        status = (
            stop_model_server(settings.servers_dir, name)
            if config.action == "stop"
            else status_of(settings.servers_dir, name)
        )
        rows.append(describe(status))
    if config.action == "stop":
        door = stop_front_door(settings.servers_dir)
    elif config.action == "start" and config.serve.front_door:
        serve_front_door(
            settings.servers_dir, config.serve.host, config.serve.front_door_port,
            config.serve.startup_timeout_s,
        )  # fmt: skip
        door = front_door_status(settings.servers_dir)
    else:
        door = front_door_status(settings.servers_dir)
    if config.serve.front_door or door.handle is not None:
        rows.append(describe(door))
        logger.info("front door: %s %s", door.state, door.detail)
    publish_table("servers", rows, f"Model servers after '{config.action}'")
    return rows


if __name__ == "__main__":
    import sys

    action = sys.argv[1] if len(sys.argv) > 1 else "status"
    print(json.dumps(serve(ServeFlowConfig(action=action)), indent=2))
