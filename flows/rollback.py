"""Put an earlier registered version back in Production/champion and re-serve it."""

from __future__ import annotations

from prefect import flow, get_run_logger

from flows._runtime import run_from_command_line
from flows._serving import serve_champions
from slmops.config import RegistrySpec, RollbackConfig, Settings, WrapperKind
from slmops.store import ModelStore
from tasks.registry import ModelVersionRef, PromotionReport, rollback_version
from tasks.reporting import publish_table


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
