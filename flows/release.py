"""The release flow: fetch -> build both wrappers -> validate -> register -> promote -> serve."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator

from prefect import flow, get_run_logger
from pydantic import BaseModel

from slmops.config import HubSpec, OnnxExportSpec, ReleaseConfig, Settings, WrapperKind
from slmops.reports import ReleaseReport, WrapperOutcome, release_markdown, validation_row
from slmops.tiny_model import TRAINED_ANSWERS
from tasks.hub import fetch_model_snapshot, fetch_onnx_release
from tasks.mlflow_models import log_chat_pipeline, log_onnx_chat_model, log_onnx_prompt_model
from tasks.onnx_export import export_onnx
from tasks.onnx_storage import store_onnx_folder
from tasks.registry import champion_version, promote_version, register_version
from tasks.reporting import publish_link, publish_markdown, publish_table
from tasks.serving import make_room_for_model, serve_front_door, serve_model
from tasks.validation import compare_runtimes, validate_model

SMOKE_QUESTION = next(iter(TRAINED_ANSWERS))
EXPERIMENT = "slmops-release"


class ReleaseValidationError(RuntimeError):
    """At least one wrapper failed validation; it was registered but not promoted."""


@contextlib.contextmanager
def hub_endpoint(hub: HubSpec, settings: Settings) -> Iterator[str | None]:
    """The hub to download from: a loopback fake hub for the embedded model, else the real one."""
    if hub.source == "embedded":
        from slmops.fake_hub import serve_embedded

        with serve_embedded(settings.embedded_cache_dir) as fake:
            yield fake.endpoint
    else:
        yield settings.hf_endpoint


def _release_run_name() -> str:
    from prefect.runtime import flow_run

    config = flow_run.parameters.get("config") or {}
    if isinstance(config, BaseModel):  # called from Python with a ReleaseConfig
        config = config.model_dump()
    hub = config.get("hub", {}) if isinstance(config, dict) else {}
    repo = str(hub.get("repo_id", "microsoft/Phi-3-mini-4k-instruct")).split("/")[-1]
    return f"release-{repo}@{hub.get('revision', 'main')}".lower()


@flow(name="release", flow_run_name=_release_run_name)
def release(config: ReleaseConfig = ReleaseConfig()) -> ReleaseReport:
    """Release a small language model as validated, registered and served MLflow models.

    Fetches the model pinned to a revision, builds the transformers chat wrapper and the
    onnxruntime-genai wrappers, validates each (signature, serving example, sample outputs),
    registers every wrapper as a new version, promotes those that passed validation
    (None -> Staging -> Production, @challenger -> @champion) and serves each Production model.

    Args:
        config: `hub` picks the model (source `embedded` = the tiny offline Phi-3 on a loopback
            hub; `hub` = the Hugging Face hub), `onnx` the ONNX export (built locally or the hub's
            release), `generation` the generation defaults, `registry` the model names, `serve`
            what is served and where, `promote` whether passing versions go to Production.
    """
    logger = get_run_logger()
    settings = Settings.from_env()
    settings.home.mkdir(parents=True, exist_ok=True)

    with hub_endpoint(config.hub, settings) as endpoint:
        snapshot = fetch_model_snapshot(config.hub, settings, endpoint)
        if config.onnx.source == "hub":
            onnx_dir = fetch_onnx_release(config.hub, settings, endpoint)
        else:
            onnx_dir = export_onnx(snapshot.path, config.onnx, settings.cache_dir / "onnx")
    source = {"repo_id": snapshot.repo_id, "revision": snapshot.revision, "commit": snapshot.commit}

    # One stored copy of the ONNX folder per release, which both ONNX wrappers reference.
    onnx_store = store_onnx_folder(
        settings.tracking_uri, EXPERIMENT, onnx_dir, config.onnx, source
    ).artifact_uri
    logged = {
        WrapperKind.CHAT_TRANSFORMERS: log_chat_pipeline(
            settings.tracking_uri, EXPERIMENT, snapshot.path, config.generation, source
        ),
        WrapperKind.PROMPT_ONNX: log_onnx_prompt_model(
            settings.tracking_uri, EXPERIMENT, onnx_dir, config.generation, config.onnx, source,
            onnx_store,
        ),
        WrapperKind.CHAT_ONNX: log_onnx_chat_model(
            settings.tracking_uri, EXPERIMENT, onnx_dir, config.generation, config.onnx, source,
            onnx_store,
        ),
    }  # fmt: skip

    parity = None
    if config.runtime_parity:
        fp32_dir = export_onnx(
            snapshot.path, OnnxExportSpec(precision="fp32"), settings.cache_dir / "onnx"
        )
        parity = compare_runtimes(
            snapshot.path, fp32_dir, tracking_uri=settings.tracking_uri,
            run_id=logged[WrapperKind.PROMPT_ONNX].run_id,
        )  # fmt: skip

    outcomes: dict[WrapperKind, WrapperOutcome] = {}
    validation_rows = []
    for kind, ref in logged.items():
        if config.serve.enabled:
            # Validation loads the new version beside the running servers: memory-safe order.
            make_room_for_model(
                ref.model_uri, config.registry.model_name(kind), settings.servers_dir,
                settings.tracking_uri, config.serve.memory_budget_gb,
            )  # fmt: skip
        report = validate_model(
            settings.tracking_uri, ref, known_answers=config.hub.source == "embedded",
            parity=parity if kind is not WrapperKind.CHAT_TRANSFORMERS else None,
        )  # fmt: skip
        name = config.registry.model_name(kind)
        validation_rows.append(validation_row(name, report))
        tags = {
            "slmops.source.repo_id": snapshot.repo_id,
            "slmops.source.commit": snapshot.commit,
            "slmops.onnx": config.onnx.model_dump_json()
            if kind is not WrapperKind.CHAT_TRANSFORMERS
            else "",
            "slmops.validation.passed": str(report.passed).lower(),
            "slmops.validation.summary": report.summary()[:4000],
        }
        version = register_version(
            settings.tracking_uri, ref.model_uri, name, tags, settings.home / "locks"
        )
        promoted = False
        if report.passed and config.promote:
            reason = f"release of {snapshot.repo_id}@{snapshot.commit[:12]}: validation passed"
            promotion = promote_version(
                settings.tracking_uri, version, reason, settings.home / "locks"
            )
            promoted = True
            publish_table(
                f"{name}-registry-moves",
                [e.model_dump() for e in promotion.audit],
                f"Stage and alias moves of {name}",
            )
        champion = champion_version(settings.tracking_uri, name)
        outcomes[kind] = WrapperOutcome(
            kind=kind,
            registered_model=name,
            model_uri=ref.model_uri,
            version=version.version,
            validation_passed=report.passed,
            validation_summary=report.summary(),
            promoted=promoted,
            production_version=champion.version if champion else None,
        )

    publish_table(
        "validation-results", validation_rows, "Validation of each wrapper built by this release"
    )

    if config.serve.enabled:
        for slot, kind in enumerate(config.serve.kinds):
            outcome = outcomes[kind]
            if outcome.production_version is None:
                logger.warning(
                    "%s has no Production version: nothing to serve", outcome.registered_model
                )
                continue
            # By alias, resolved under the serving lock: with two releases at once, whichever
            # serves last serves the final champion, not the version it promoted itself.
            served = serve_model(
                f"models:/{outcome.registered_model}@champion",
                outcome.registered_model, kind, config.serve.host, config.serve.base_port, slot,
                settings.servers_dir, settings.tracking_uri, config.serve.startup_timeout_s,
                SMOKE_QUESTION, config.serve.memory_budget_gb,
                config.serve.request_timeout_s,
            )  # fmt: skip
            outcomes[kind] = outcome.model_copy(
                update={"endpoint": served.handle.url, "sample_answer": served.answer}
            )
            publish_link(
                f"{outcome.registered_model}-endpoint",
                f"{served.handle.url}/invocations",
                served.handle.model_uri,
                "Served Production model",
            )
        # The OpenAI-compatible front door over the served chat models (issue 5): started
        # once, then reused; it follows the blue/green switches above on its own.
        if config.serve.front_door:
            door = serve_front_door(
                settings.servers_dir, config.serve.host, config.serve.front_door_port,
                config.serve.startup_timeout_s,
            )  # fmt: skip
            publish_link(
                "front-door",
                f"{door.openai_base_url}/chat/completions",
                "OpenAI-compatible /v1/chat/completions",
                "Front door for the served chat models (model = registered name)",
            )

    result = ReleaseReport(
        repo_id=snapshot.repo_id, commit=snapshot.commit, tracking_uri=settings.tracking_uri,
        outcomes=tuple(outcomes.values()),
    )  # fmt: skip
    publish_markdown(
        "release-summary",
        release_markdown(result),
        "What this release registered, promoted and served",
    )
    for outcome in result.outcomes:
        if outcome.sample_answer is not None:
            print(
                f"{outcome.registered_model} v{outcome.production_version} at {outcome.endpoint}: {outcome.sample_answer!r}"
            )
    if result.failed:
        names = ", ".join(f"{o.registered_model} v{o.version}" for o in result.failed)
        raise ReleaseValidationError(
            f"validation failed for {names}; not promoted:\n"
            + "\n".join(o.validation_summary for o in result.failed)
        )
    return result


def load_config(argument: str | None) -> ReleaseConfig:
    """A ReleaseConfig from a parameter file (deployments/*.yaml), a JSON string, or defaults."""
    if argument is None:
        return ReleaseConfig()
    if argument.endswith((".yaml", ".yml")):
        import yaml

        with open(argument) as handle:
            return ReleaseConfig.model_validate(yaml.safe_load(handle)["config"])
    return ReleaseConfig.model_validate_json(argument)


if __name__ == "__main__":
    import sys

    report = release(load_config(sys.argv[1] if len(sys.argv) > 1 else None))
    print(json.dumps(report.model_dump(mode="json"), indent=2))
