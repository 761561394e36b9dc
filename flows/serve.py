"""Start (or repair), stop, or report the `mlflow models serve` processes of the Production models."""

from __future__ import annotations

import json

from prefect import flow, get_run_logger

from slmops.config import ServeFlowConfig, Settings
from slmops.tiny_model import TRAINED_ANSWERS
from tasks.registry import champion_version
from tasks.reporting import publish_table
from tasks.serving import ServingError, describe, serve_model, status_of, stop_model_server

SMOKE_QUESTION = next(iter(TRAINED_ANSWERS))


@flow(name="serve", flow_run_name="serve-{config.action}")
def serve(config: ServeFlowConfig = ServeFlowConfig()) -> list[dict]:
    """Manage the model servers of the Production (champion) versions.

    Args:
        config: `action` is `start` (serve each champion; a dead or stale server is replaced),
            `stop` (stop every server) or `status` (report only); `registry` names the models;
            `serve` gives the kinds, host and ports.
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
                champion.uri, name, kind, config.serve.host, config.serve.base_port, slot,
                settings.servers_dir, settings.tracking_uri, config.serve.startup_timeout_s,
                SMOKE_QUESTION,
            )  # fmt: skip
            status = status_of(settings.servers_dir, name)
        else:
            status = status_of(settings.servers_dir, name)
        rows.append(describe(status))
        logger.info("%s: %s %s", name, status.state, rows[-1]["url"])
    publish_table("servers", rows, f"Model servers after '{config.action}'")
    return rows


if __name__ == "__main__":
    import sys

    action = sys.argv[1] if len(sys.argv) > 1 else "status"
    print(json.dumps(serve(ServeFlowConfig(action=action)), indent=2))
