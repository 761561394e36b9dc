"""Start (or repair), stop, or report the `mlflow models serve` processes of the Production models."""

from __future__ import annotations

import json

from prefect import flow, get_run_logger

from flows._runtime import run_from_command_line
from flows._serving import serve_champions
from slmops.config import RegistrySpec, ServeFlowConfig, Settings
from tasks.release_records import settle_killed_releases
from tasks.reporting import publish_table
from tasks.serving import (
    describe,
    front_door_status,
    served_names,
    status_of,
    stop_front_door,
    stop_model_server,
)


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
    settle_killed_releases(settings.home)
    if config.action == "start":
        serve_champions(config.serve, config.registry, settings, require_champion=True)
    rows = []
    for kind in config.serve.kinds:
        name = config.registry.model_name(kind)
        if config.action == "stop":
            status = stop_model_server(settings.servers_dir, name)
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
    else:
        door = front_door_status(settings.servers_dir)
    if config.serve.front_door or door.handle is not None:
        rows.append(describe(door))
        logger.info("front door: %s %s", door.state, door.detail)
    publish_table("servers", rows, f"Model servers after '{config.action}'")
    return rows


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(
        description="Start (or repair), stop, or report the model servers."
    )
    parser.add_argument("action", nargs="?", default="status", choices=["start", "stop", "status"])
    parser.add_argument(
        "--name-prefix", default=RegistrySpec().name_prefix, help="registry.name_prefix"
    )
    args = parser.parse_args()
    config = ServeFlowConfig(
        action=args.action, registry=RegistrySpec(name_prefix=args.name_prefix)
    )
    print(json.dumps(run_from_command_line(lambda: serve(config)), indent=2))
