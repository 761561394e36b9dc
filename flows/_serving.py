"""The serving step the release, rollback and serve flows share. Not a flow."""

from __future__ import annotations

from collections.abc import Iterable

from prefect import get_run_logger

from slmops.config import ModelServerSpec, RegistrySpec, ServeSpec, Settings, WrapperKind
from slmops.families import PHI3
from slmops.store import ModelStore
from tasks.registry import champion_version
from tasks.reporting import publish_link
from tasks.serving import ServeResult, ServingError, serve_front_door, serve_model


def serve_champions(
    serve: ServeSpec,
    registry: RegistrySpec,
    settings: Settings,
    kinds: Iterable[WrapperKind] | None = None,
    *,
    require_champion: bool = False,
) -> dict[WrapperKind, ServeResult]:
    """Serve the `@champion` of each kind (default: every kind `serve` lists), then the front door.

    Servers are started by alias, resolved under the serving lock: with two runs at once,
    whichever serves last serves the final champion, not the version it promoted itself. A
    server already serving the champion is reused; another is replaced blue/green.

    Args:
        serve: what is served and where (kinds fix each kind's port slot).
        registry: the registered model names.
        settings: the store and the servers folder.
        kinds: a subset of `serve.kinds` to serve (rollback serves one).
        require_champion: fail on a model without a champion, instead of skipping it.
    """
    logger = get_run_logger()
    store = ModelStore.from_settings(settings)
    served: dict[WrapperKind, ServeResult] = {}
    wanted = set(serve.kinds if kinds is None else kinds)
    for kind in serve.kinds:
        if kind not in wanted:
            continue
        name = registry.model_name(kind)
        if champion_version(store, name) is None:
            if require_champion:
                raise ServingError(f"{name} has no champion version to serve; run a release first")
            logger.warning("%s has no Production version: nothing to serve", name)
            continue
        spec = ModelServerSpec.from_serve(
            serve, f"models:/{name}@champion", name, kind, PHI3.smoke_question
        )
        result = serve_model(spec, settings.servers_dir, store)
        served[kind] = result
        publish_link(
            f"{name}-endpoint",
            f"{result.handle.url}/invocations",
            result.handle.model_uri,
            "Served Production model",
        )
    # The OpenAI-compatible front door over the served chat models: started once, then reused;
    # it follows the blue/green switches on its own.
    if serve.front_door:
        door = serve_front_door(
            settings.servers_dir, serve.host, serve.front_door_port, serve.startup_timeout_s
        )
        publish_link(
            "front-door",
            f"{door.openai_base_url}/chat/completions",
            "OpenAI-compatible /v1/chat/completions",
            "Front door for the served chat models (model = registered name)",
        )
    return served
