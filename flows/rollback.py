"""Put an earlier registered version back in Production/champion and re-serve it."""

from __future__ import annotations

from prefect import flow, get_run_logger

from slmops.config import RollbackConfig, Settings, WrapperKind
from slmops.tiny_model import TRAINED_ANSWERS
from tasks.registry import ModelVersionRef, PromotionReport, rollback_version
from tasks.reporting import publish_table
from tasks.serving import serve_model

SMOKE_QUESTION = next(iter(TRAINED_ANSWERS))


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
    report = rollback_version(settings.tracking_uri, ref, config.reason, settings.home / "locks")
    publish_table(
        "rollback-audit", [e.model_dump() for e in report.audit], f"Registry moves of {name}"
    )
    if config.serve.enabled and config.kind in config.serve.kinds:
        slot = config.serve.kinds.index(config.kind)
        result = serve_model(
            ref.uri, name, config.kind, config.serve.host, config.serve.base_port, slot,
            settings.servers_dir, settings.tracking_uri, config.serve.startup_timeout_s,
            SMOKE_QUESTION, config.serve.memory_budget_gb,
            config.serve.request_timeout_s,
        )  # fmt: skip
        get_run_logger().info("%s v%s serving on %s", name, ref.version, result.handle.url)
    return report


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=rollback.__doc__)
    parser.add_argument("kind", choices=[k.value for k in WrapperKind])
    parser.add_argument("version", type=int)
    parser.add_argument("reason")
    args = parser.parse_args()
    rollback(RollbackConfig(kind=args.kind, version=args.version, reason=args.reason))
