"""Put an earlier registered version back in Production/champion and re-serve it."""

from __future__ import annotations

from mlflow.exceptions import MlflowException
from prefect import flow, get_run_logger

from flows._runtime import run_from_command_line
from flows._serving import serve_champions
from slmops.config import RegistrySpec, RollbackConfig, Settings, WrapperKind
from slmops.errors import ExplainedError
from slmops.store import ModelStore
from tasks.registry import (
    ModelVersionRef,
    PromotionReport,
    champion_version,
    refuse_pruned,
    rollback_version,
)
from tasks.reporting import publish_table
from tasks.serving import check_serving_fits


class RollbackMemoryError(ExplainedError):
    """The version's server cannot fit in memory even once the current one is stopped: the
    rollback was refused before any registry move, and Production stays served."""


def check_rollback_fits(config: RollbackConfig, settings: Settings, ref: ModelVersionRef) -> None:
    """Refuse, before the registry moves, a rollback whose server could not be started.

    Moving Production first would leave it naming a version that is not served (measured on
    the Phi-3-mini twin: bf16 back to v1 beside two ONNX servers was 0.04 GiB over its budget
    even stop-first, and the registry had already moved).
    """
    store = ModelStore.from_settings(settings)
    client = store.client()
    refuse_pruned(client, ref.name, ref.version, "roll back to")
    try:
        client.get_model_version(ref.name, str(ref.version))
    except MlflowException:
        return  # not registered: rollback_version says so in its own words
    plan = check_serving_fits(
        f"models:/{ref.name}/{ref.version}", ref.name, settings.servers_dir, store,
        config.serve.memory_budget_gb,
    )  # fmt: skip
    if plan is not None and plan.order == "refuse":
        current = champion_version(store, ref.name)
        stays = f"v{current.version}" if current else "nothing"
        raise RollbackMemoryError(
            f"not rolling {ref.name} back to v{ref.version}: its server cannot fit "
            f"({plan.describe()}). Production stays {stays}, still served. Free memory (stop "
            "other servers, fewer serve.kinds) or raise serve.memory_budget_gb, then roll back "
            "again"
        )


@flow(name="rollback", flow_run_name="rollback-{config.kind.value}-to-v{config.version}")
def rollback(config: RollbackConfig) -> PromotionReport:
    """Roll a registered model back to an earlier version and serve that version.

    Args:
        config: `kind` picks the wrapper, `version` the version to restore, `reason` goes into
            the audit trail; `registry` and `serve` as in the release flow.
    """
    settings = Settings.from_env()
    name = config.registry.model_name(config.kind)
    ref = ModelVersionRef(name=name, version=config.version)
    if config.serve.enabled and config.kind in config.serve.kinds:
        check_rollback_fits(config, settings, ref)
    report = rollback_version(
        ModelStore.from_settings(settings), ref, config.reason, settings.registry_locks
    )
    publish_table(
        "rollback-audit", [e.model_dump() for e in report.audit], f"Registry moves of {name}"
    )
    if config.serve.enabled and config.kind in config.serve.kinds:
        served = serve_champions(config.serve, config.registry, settings, kinds=[config.kind])
        if config.kind in served:
            url = served[config.kind].handle.url
            get_run_logger().info("%s v%s serving on %s", name, ref.version, url)
    return report


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=rollback.__doc__)
    parser.add_argument("kind", choices=[k.value for k in WrapperKind])
    parser.add_argument("version", type=int)
    parser.add_argument("reason")
    parser.add_argument(
        "--name-prefix", default=RegistrySpec().name_prefix, help="registry.name_prefix"
    )
    args = parser.parse_args()
    config = RollbackConfig(
        kind=args.kind, version=args.version, reason=args.reason,
        registry=RegistrySpec(name_prefix=args.name_prefix),
    )  # fmt: skip
    run_from_command_line(lambda: rollback(config))
