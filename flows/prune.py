"""Retention: delete the stored files of old Archived versions, keeping the newest per model."""

from __future__ import annotations

import json

from prefect import flow, get_run_logger

from flows._runtime import run_from_command_line
from slmops.config import PruneConfig, Settings
from slmops.retention import PruneReport
from slmops.store import ModelStore
from tasks.reporting import publish_table
from tasks.retention import prune_versions


@flow(name="prune", flow_run_name="prune-{config.registry.name_prefix}")
def prune(config: PruneConfig = PruneConfig()) -> PruneReport:
    """Free the artifact store of old releases: the files of every Archived version older than
    the newest `keep_last` released versions of its registered model are deleted, and the version is tagged
    `slmops.pruned` (kept in the registry with its audit trail; it can no longer be served,
    rolled back to or promoted). Production, Staging and aliased versions, and files or ONNX
    folders that a kept version still uses, are never deleted. Each deletion is audited.

    Args:
        config: `registry` and `kinds` name the registered models, `keep_last` how many of the
            newest released versions (Production or Archived) of each are kept, `dry_run`
            reports what would be deleted without deleting, `reason` goes into the audit trail.
    """
    settings = Settings.from_env()
    names = [config.registry.model_name(kind) for kind in config.kinds]
    report = prune_versions(
        ModelStore.from_settings(settings), names, config.keep_last, config.reason,
        settings.registry_locks, dry_run=config.dry_run,
    )  # fmt: skip
    done = "would free" if config.dry_run else "freed"
    publish_table(
        "prune-dry-run" if config.dry_run else "prune-audit",
        report.rows(),
        f"Retention of {', '.join(names)} (newest {config.keep_last} kept): "
        f"{done} {report.freed_bytes / 1e6:.1f} MB",
    )
    get_run_logger().info(
        "%d version(s) %s, %s %.1f MB",
        len(report.pruned),
        "would be pruned" if config.dry_run else "pruned",
        done,
        report.freed_bytes / 1e6,
    )
    return report


def load_config(argument: str | None, dry_run: bool = False) -> PruneConfig:
    """A PruneConfig from a parameter file (YAML with a `config:` key), a JSON string, or
    defaults; `dry_run` set on top."""
    if argument is None:
        config = PruneConfig()
    elif argument.endswith((".yaml", ".yml")):
        import yaml

        with open(argument) as handle:
            config = PruneConfig.model_validate(yaml.safe_load(handle)["config"])
    else:
        config = PruneConfig.model_validate_json(argument)
    return config.model_copy(update={"dry_run": True}) if dry_run else config


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Delete the stored files of old versions.")
    parser.add_argument("config", nargs="?", help="a YAML parameter file or JSON (PruneConfig)")
    parser.add_argument("--dry-run", action="store_true", help="report only; delete nothing")
    args = parser.parse_args()
    config = load_config(args.config, args.dry_run)
    report = run_from_command_line(lambda: prune(config))
    print(json.dumps(report.model_dump(mode="json"), indent=2))
