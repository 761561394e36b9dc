"""Start (or repair), stop, or report the `mlflow models serve` processes of the Production models."""

from __future__ import annotations

import json

from prefect import flow, get_run_logger

from flows._runtime import run_from_command_line
from flows._serving import serve_champions
from slmops.config import RegistrySpec, ServeFlowConfig, Settings
from slmops.servers import FRONT_DOOR
from slmops.store import ModelStore
from tasks.release_records import settle_killed_releases
from tasks.reporting import publish_table
from tasks.serving import describe, served_names, status_of, stop_server


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
    settle_killed_releases(settings.home, ModelStore.from_settings(settings))
    if config.action == "start":
        serve_champions(config.serve, config.registry, settings, require_champion=True)
    act = stop_server if config.action == "stop" else status_of
    rows = []
    # The configured models first, then servers of kinds this run was not asked about (started
    # with another `serve.kinds`): `stop` means every server. The front door last.
    names = [config.registry.model_name(kind) for kind in config.serve.kinds]
    names += sorted(set(served_names(settings.servers_dir)) - set(names))
    for name in names:
        status = act(settings.servers_dir, name)
        rows.append(describe(status))
        logger.info("%s: %s %s", name, status.state, rows[-1]["url"])
    door = act(settings.servers_dir, FRONT_DOOR)
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
    # Validated like a deployment's parameters (argparse gives the action as a plain str).
    config = ServeFlowConfig.model_validate(
        {"action": args.action, "registry": {"name_prefix": args.name_prefix}}
    )
    print(json.dumps(run_from_command_line(lambda: serve(config)), indent=2))
