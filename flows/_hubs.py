"""The one place that maps `HubSpec.source` to the hub a release downloads from. Not a flow.

Two implementations of one interface, as Dagster's project_fully_featured maps environments to
resources: `hub` is the Hugging Face hub (or the mirror HF_ENDPOINT names) with HF_TOKEN;
`embedded` is the offline kit's loopback fake hub serving the embedded tiny Phi-3, built on first
use, with no token (a real token has no business there). Tasks never ask which one they got.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

from prefect import get_run_logger

from slmops.config import HubSpec, Settings
from tasks.hub import HubConnection, hf_cache_dir


@contextlib.contextmanager
def _huggingface(settings: Settings) -> Iterator[HubConnection]:
    yield HubConnection(
        endpoint=settings.hf_endpoint, token=settings.hf_token, cache_dir=hf_cache_dir(settings)
    )


@contextlib.contextmanager
def _embedded(settings: Settings) -> Iterator[HubConnection]:
    # Imported here: the kit (and torch, to build the model) only when this source is chosen.
    from offline_kit.fake_hub import serve_embedded

    with serve_embedded(settings.embedded_cache_dir, progress=get_run_logger().info) as fake:
        yield HubConnection(endpoint=fake.endpoint, token=None, cache_dir=hf_cache_dir(settings))


HUBS: dict[str, Callable[[Settings], AbstractContextManager[HubConnection]]] = {
    "hub": _huggingface,
    "embedded": _embedded,
}


def connect_hub(spec: HubSpec, settings: Settings) -> AbstractContextManager[HubConnection]:
    """The hub `spec.source` names, open for the block."""
    return HUBS[spec.source](settings)
