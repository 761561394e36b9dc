"""Managed `mlflow models serve` processes: start, health-check, smoke-test, switch, stop, status.

Each served registered model has a state file `<servers_dir>/<name>.json` naming its process
(pid + start time, so a reused pid is not mistaken for ours), port and model version. A new
version is started beside the old one (blue/green ports), checked, then the state file is
switched and the old process stopped: the old endpoint answers until the new one is proven.
Processes run in their own session so a cancelled flow run does not take them down.

The OpenAI-compatible front door (`slmops.front_door`) is managed the same way, with the state
file `<servers_dir>/front-door.json`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psutil
from filelock import FileLock
from mlflow.exceptions import MlflowException
from prefect import get_run_logger, task
from pydantic import BaseModel, ConfigDict

from slmops import onnx_genai_runtime
from slmops.config import DEFAULT_REQUEST_TIMEOUT_S, ModelServerSpec, WrapperKind
from slmops.onnx_genai_runtime import STREAM_PORT_VARIABLE
from slmops.servers import (
    FRONT_DOOR,
    ServerHandle,
    ServerStatus,
    ServingError,
    answer_text,
    model_servers,
    read_handle,
    sample_request,
    server_names,
    state_path,
    write_handle,
)
from slmops.serving_memory import (
    ServerSizing,
    SwitchPlan,
    onnx_server_sizing,
    plan_switch,
    transformers_server_sizing,
    unknown_server_sizing,
)
from slmops.store import ModelStore

HUB_TOKEN_VARIABLES = frozenset({"HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"})


def is_running(handle: ServerHandle) -> bool:
    return _is_ours(handle.pid, handle.process_started)


def _is_ours(pid: int, process_started: float) -> bool:
    try:
        proc = psutil.Process(pid)
        return (
            abs(proc.create_time() - process_started) < 1.0
            and proc.status() != psutil.STATUS_ZOMBIE
        )
    except psutil.NoSuchProcess:
        return False


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _port_is_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def choose_port(host: str, base_port: int | None, slot: int, current: ServerHandle | None) -> int:
    """A free port: from the blue/green pair `base_port + 2*slot + {0,1}` when a base is set."""
    if base_port is None:
        return _free_port(host)
    for port in (base_port + 2 * slot, base_port + 2 * slot + 1):
        if (current is None or port != current.port) and _port_is_free(host, port):
            return port
    raise ServingError(
        f"no free port in {base_port + 2 * slot}..{base_port + 2 * slot + 1} on {host}"
    )


def _answers(url: str, timeout: float = 2.0) -> bool:
    try:
        return httpx.get(url, timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def healthy(url: str, timeout: float = 2.0) -> bool:
    return _answers(f"{url}/ping", timeout)


def _log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def launch_server(
    model_uri: str,
    name: str,
    kind: WrapperKind,
    host: str,
    port: int,
    servers_dir: Path,
    store: ModelStore,
    startup_timeout_s: float,
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
    alias: str = "",
) -> ServerHandle:
    """Start `mlflow models serve` and wait until `/ping` answers; kill it if it never does.

    `alias` is the registry alias `model_uri` was resolved from (recorded, e.g. for metrics).
    """
    servers_dir.mkdir(parents=True, exist_ok=True)
    log_path = servers_dir / f"{name}-{port}.log"
    # The ONNX chat model streams its engine's tokens on a second port of the same process
    # (slmops.onnx_genai_runtime.serve_token_stream): `/invocations` cannot stream.
    stream_port = _free_port(host) if kind is WrapperKind.CHAT_ONNX else None
    stream_env = {STREAM_PORT_VARIABLE: str(stream_port)} if stream_port else {}
    env = {
        # A served model is loaded from the store, never from the hub: no hub token for it.
        **{
            k: v
            for k, v in os.environ.items()
            if k not in HUB_TOKEN_VARIABLES and k != STREAM_PORT_VARIABLE
        },
        **store.environment(),
        # Past it a request gets a 504: Phi-3-mini in bf16 on 2 cores needs ~55 s for a
        # 32-token answer, so the default 60 s is too short for the real model.
        "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT": str(int(request_timeout_s)),
        # `mlflow models serve --env-manager local` execs uvicorn from PATH.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        **stream_env,
    }
    cmd = [
        sys.executable, "-m", "mlflow", "models", "serve",
        "-m", model_uri, "-h", host, "-p", str(port), "--env-manager", "local",
    ]  # fmt: skip
    return _spawn_server(
        cmd, env, log_path, "/ping", startup_timeout_s, f"mlflow models serve for {model_uri}",
        name=name, host=host, port=port, kind=kind, model_uri=model_uri, alias=alias,
        request_timeout_s=request_timeout_s, stream_port=stream_port,
    )  # fmt: skip


def _spawn_server(
    cmd: list[str],
    env: dict[str, str],
    log_path: Path,
    health_path: str,
    startup_timeout_s: float,
    what: str,
    **handle: Any,
) -> ServerHandle:
    """Start `cmd` in its own session and wait until `health_path` on its `host`:`port` answers
    200; its handle, with the process and start time filled in from `handle`'s fields.

    A process that exits or never gets healthy is an error (and is killed).
    """
    health_url = f"http://{handle['host']}:{handle['port']}{health_path}"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    process_started = psutil.Process(proc.pid).create_time()
    deadline = time.monotonic() + startup_timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServingError(f"{what} exited with {proc.returncode}:\n{_log_tail(log_path)}")
        if _answers(health_url):
            return ServerHandle(
                **handle,
                pid=proc.pid,
                process_started=process_started,
                log_path=log_path,
                started_at=datetime.now(UTC).isoformat(timespec="seconds"),
            )
        time.sleep(0.5)
    _stop_process_group(proc.pid, process_started)
    raise ServingError(
        f"{what} not healthy on {health_url} after {startup_timeout_s:.0f}s:\n{_log_tail(log_path)}"
    )


def terminate(handle: ServerHandle, grace_s: float = 10.0) -> None:
    """Stop the server's whole process group (uvicorn workers included)."""
    _stop_process_group(handle.pid, handle.process_started, grace_s)


def _stop_process_group(pid: int, process_started: float, grace_s: float = 10.0) -> None:
    if not _is_ours(pid, process_started):
        return
    try:
        leader = psutil.Process(pid)
        # Wait for the children too: `mlflow models serve` execs uvicorn as a child, which keeps
        # accepting connections until it has handled the signal.
        members = [leader, *leader.children(recursive=True)]
        os.killpg(pid, signal.SIGTERM)
    except (ProcessLookupError, psutil.NoSuchProcess):
        return
    _, alive = psutil.wait_procs(members, timeout=grace_s)
    if alive:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        psutil.wait_procs(alive, timeout=grace_s)


def ask(handle: ServerHandle, question: str, max_tokens: int = 32, timeout: float = 120.0) -> str:
    """Send one question over HTTP and return the answer text."""
    response = httpx.post(
        f"{handle.url}/invocations",
        json=sample_request(handle.model_kind, question, max_tokens),
        timeout=max(timeout, handle.request_timeout_s + 10.0),  # the server gives up first
    )
    if response.status_code != 200:
        raise ServingError(
            f"{handle.url}/invocations answered {response.status_code}: {response.text[:500]}"
        )
    return answer_text(handle.model_kind, response.json())


def check_health(handle: ServerHandle) -> None:
    """`/ping` and `/version` answer (no model call)."""
    if not healthy(handle.url):
        raise ServingError(f"{handle.url}/ping is not healthy")
    version = httpx.get(f"{handle.url}/version", timeout=5.0)
    if version.status_code != 200 or not version.text.strip():
        raise ServingError(f"{handle.url}/version answered {version.status_code}")


def check_server(
    handle: ServerHandle, question: str, expect: Callable[[str], bool] | None = None
) -> str:
    """Health (`/ping`, `/version`) and a smoke request whose answer must be non-empty."""
    check_health(handle)
    answer = ask(handle, question)
    if not answer.strip():
        raise ServingError(f"{handle.url} answered an empty string to {question!r}")
    if expect is not None and not expect(answer):
        raise ServingError(
            f"{handle.url} answered {answer!r} to {question!r}, which failed the check"
        )
    return answer


def status_of(servers_dir: Path, name: str) -> ServerStatus:
    """What `name`'s state file and its process say now (a model server or the front door)."""
    handle = read_handle(servers_dir, name)
    if handle is None:
        return ServerStatus(name=name, state="absent")
    if not is_running(handle):
        return ServerStatus(
            name=name, state="dead", handle=handle, detail=_log_tail(handle.log_path, 5)
        )
    if handle.is_front_door:
        return _front_door_status(handle)
    if not healthy(handle.url):
        return ServerStatus(name=name, state="unhealthy", handle=handle)
    return ServerStatus(name=name, state="serving", handle=handle)


def _front_door_status(handle: ServerHandle) -> ServerStatus:
    # Its /health names the chat models it fronts: the detail operators want to see.
    try:
        response = httpx.get(handle.health_url, timeout=2.0)
        models = response.json()["models"] if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        models = None
    if models is None:
        return ServerStatus(name=handle.name, state="unhealthy", handle=handle)
    detail = f"{handle.openai_base_url}: {', '.join(models) or 'no chat model served'}"
    return ServerStatus(name=handle.name, state="serving", handle=handle, detail=detail)


@contextlib.contextmanager
def serving_lock(servers_dir: Path, name: str) -> Iterator[None]:
    """Serialise starting and switching the server of `name` across processes on this host."""
    servers_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(servers_dir / f"{name}.lock"):
        yield


def alias_of(model_uri: str) -> str:
    """The alias of `models:/name@alias` ("champion"); "" for any other URI."""
    if not model_uri.startswith("models:/") or "@" not in model_uri:
        return ""
    return model_uri.rsplit("@", 1)[1]


def resolve_alias(model_uri: str, store: ModelStore) -> str:
    """`models:/name/<version>` for `models:/name@alias`; any other URI as it is."""
    if not model_uri.startswith("models:/") or "@" not in model_uri:
        return model_uri
    name, alias = model_uri.removeprefix("models:/").split("@", 1)
    client = store.client()
    return f"models:/{name}/{client.get_model_version_by_alias(name, alias).version}"


class ServeResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    handle: ServerHandle
    answer: str | None  # the smoke question's answer; None for a reused server (not re-asked)
    replaced: ServerHandle | None = None
    reused: bool = False
    switch: SwitchPlan | None = None  # the memory check's verdict, when a server was started


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def local_model_folder(model_uri: str, store: ModelStore) -> Path:
    """A model's folder on local disk: the stored one itself for a local artifact store.

    Resolved with a client of `store`: `download_artifacts("models:/...")` would ask the
    process-wide registry, which need not be the store's.
    """
    import mlflow

    client = store.client()
    location = model_uri
    if model_uri.startswith("models:/"):
        ref = resolve_alias(model_uri, store).removeprefix("models:/")
        if not ref.startswith("m-"):
            name, version = ref.rsplit("/", 1)
            found = client.get_model_version(name, version)
            ref = _version_model_id(found) or ""
            location = str(found.source)
        if ref.startswith("m-"):
            # The LoggedModel's own location: `models:/m-...` would be copied to a temp folder.
            location = client.get_logged_model(ref).artifact_location
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=location))


@dataclass(frozen=True)
class _StoredModel:
    """A model's folder, its bytes on disk (the shared ONNX folder it references included), its
    MLmodel, and its ONNX folder if it has one."""

    folder: Path
    files_bytes: int
    mlmodel: dict[str, Any]
    onnx_folder: Path | None


def _stored_model(model_uri: str, store: ModelStore) -> _StoredModel:
    """`_StoredModel` of `model_uri`; for a local store this reads the stored folders in place."""
    import mlflow
    import yaml

    folder = local_model_folder(model_uri, store)
    total = _folder_bytes(folder)
    mlmodel_path = folder / "MLmodel"
    mlmodel = (yaml.safe_load(mlmodel_path.read_text()) if mlmodel_path.exists() else None) or {}
    pyfunc_conf = mlmodel.get("flavors", {}).get("python_function", {})
    onnx_uri = (pyfunc_conf.get("config") or {}).get(onnx_genai_runtime.ONNX_URI_KEY)
    own_onnx = (pyfunc_conf.get("artifacts") or {}).get(onnx_genai_runtime.ARTIFACT_KEY)
    onnx_folder = None
    if onnx_uri:
        onnx_folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=str(onnx_uri)))
        total += _folder_bytes(onnx_folder)
    elif own_onnx and own_onnx.get("path"):
        onnx_folder = folder / own_onnx["path"]
    return _StoredModel(folder, total, mlmodel, onnx_folder)


def model_files_bytes(model_uri: str, store: ModelStore) -> int:
    """Bytes of a model's files, the shared ONNX folder it references included."""
    return _stored_model(model_uri, store).files_bytes


def model_server_sizing(model_uri: str, store: ModelStore) -> ServerSizing:
    """What a server of `model_uri` may hold at full load: weights, process, key-value cache.

    Read from the stored model: the ONNX wrappers' `genai_config.json`, key-value dtype (the
    graph's first past-key input) and engine settings (`model_config`); the transformers
    flavor's `config.json`.
    """
    model = _stored_model(model_uri, store)
    onnx_folder = model.onnx_folder
    genai_path = next(onnx_folder.rglob("genai_config.json"), None) if onnx_folder else None
    if genai_path is not None:
        genai_config = json.loads(genai_path.read_text())
        model_config = model.mlmodel["flavors"]["python_function"].get("config") or {}
        return onnx_server_sizing(
            model.files_bytes,
            genai_config,
            _onnx_kv_dtype_bytes(genai_path.parent, genai_config),
            int(model_config.get(onnx_genai_runtime.MAX_BATCH_SIZE_KEY)
                or onnx_genai_runtime.DEFAULT_MAX_BATCH_SIZE),
            int(model_config.get(onnx_genai_runtime.TOKEN_BUDGET_KEY)
                or onnx_genai_runtime.DEFAULT_TOKEN_BUDGET),
        )  # fmt: skip
    if "transformers" in model.mlmodel.get("flavors", {}):
        for candidate in sorted(model.folder.rglob("config.json")):
            hf_config = json.loads(candidate.read_text())
            if "num_hidden_layers" in hf_config or "text_config" in hf_config:
                return transformers_server_sizing(model.files_bytes, hf_config)
    return unknown_server_sizing(model.files_bytes)


# ONNX tensor element types -> bytes (float, float16, bfloat16).
_ONNX_ELEMENT_BYTES = {1: 4, 10: 2, 16: 2}


def _onnx_kv_dtype_bytes(onnx_folder: Path, genai_config: dict[str, Any]) -> int:
    """Bytes per key-value element: the type of the graph's first past-key input (CPU int4
    builds keep fp32 inputs); 4 when the graph cannot be read."""
    decoder = genai_config["model"]["decoder"]
    past_key = str(decoder.get("inputs", {}).get("past_key_names", "past_key_values.%d.key"))
    with contextlib.suppress(Exception):  # a graph onnx cannot read: count fp32
        import onnx

        graph = onnx.load(str(onnx_folder / decoder["filename"]), load_external_data=False).graph
        for graph_input in graph.input:
            if graph_input.name == past_key.replace("%d", "0"):
                return _ONNX_ELEMENT_BYTES.get(graph_input.type.tensor_type.elem_type, 4)
    return 4


def process_tree_rss(pid: int) -> int:
    """RSS of a process and its descendants (a server's uvicorn workers included)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            total += proc.memory_info().rss
    return total


def running_servers_rss(servers_dir: Path) -> dict[str, int]:
    """name -> measured RSS of every running managed server (model servers and front door)."""
    rss = {}
    for name in server_names(servers_dir):
        handle = read_handle(servers_dir, name)
        if handle is not None and is_running(handle):
            rss[name] = process_tree_rss(handle.pid)
    return rss


def running_servers_footprint(
    servers_dir: Path, store: ModelStore, rss: dict[str, int] | None = None
) -> dict[str, int]:
    """name -> what each running server may hold: max(measured RSS, its model's sizing).

    A server whose memory-mapped weights were evicted (under memory pressure, by a model loaded
    beside it) reads small but pages them back on its next request; an idle ONNX server has
    not yet reserved the key-value cache of a full batch.
    """
    rss = running_servers_rss(servers_dir) if rss is None else rss
    footprint = {}
    for name, measured in rss.items():
        handle = read_handle(servers_dir, name)
        sized = 0
        if handle is not None and handle.model_uri:
            # A model gone from the store is counted at its RSS.
            with contextlib.suppress(MlflowException, OSError):
                sized = model_server_sizing(handle.model_uri, store).expected_bytes
        footprint[name] = max(measured, sized)
    return footprint


def plan_server_switch(
    servers_dir: Path, name: str, model_uri: str, store: ModelStore, budget_gb: float | None
) -> SwitchPlan:
    """Measure the running servers and size the new model: blue/green, stop-first or refuse.

    The process asking (the release flow) is not counted in the budget, which bounds the
    servers; what it holds is missing from the available memory, so the limit sees it.
    """
    rss = running_servers_rss(servers_dir)
    footprint = running_servers_footprint(servers_dir, store, rss)
    try:
        sizing = model_server_sizing(model_uri, store)
    except MlflowException as error:  # before starting anything: the old server stays
        raise ServingError(f"{name}: cannot serve {model_uri}: {error.message}") from error
    return plan_switch(
        running_bytes=sum(footprint.values()),
        replaced_bytes=footprint.get(name, 0),
        new_bytes=sizing.expected_bytes,
        new_sizing=sizing,
        available_bytes=int(psutil.virtual_memory().available),
        budget_bytes=int(budget_gb * 1e9) if budget_gb is not None else None,  # GB, as named
        measured_bytes=sum(rss.values()),
    )


@task(task_run_name="check-serving-fits-{name}")
def check_serving_fits(
    model_uri: str,
    name: str,
    servers_dir: Path,
    store: ModelStore,
    memory_budget_gb: float | None = None,
) -> SwitchPlan | None:
    """How serving `model_uri` as `name` would switch, measured now, before it is promoted.

    A version whose server cannot fit even once the old one is stopped (`order == "refuse"`)
    must not be promoted: Production would name a version that is not served. None: `name`
    serves `model_uri` already.
    """
    with serving_lock(servers_dir, name):
        current = read_handle(servers_dir, name)
        if current is not None and current.model_uri == model_uri and is_running(current):
            return None
        plan = plan_server_switch(servers_dir, name, model_uri, store, memory_budget_gb)
    get_run_logger().info("%s: before promoting %s, its server: %s", name, model_uri,
                          plan.describe())  # fmt: skip
    return plan


class RoomReport(BaseModel):
    """What `make_room_for_model` found, and whether it stopped a server."""

    model_config = ConfigDict(frozen=True)

    plan: SwitchPlan | None = None  # None: the model is registered already (validated before)
    stopped: ServerHandle | None = None


def _registered_model_ids(name: str, store: ModelStore) -> set[str]:
    client = store.client()
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except Exception:  # no such registered model yet
        return set()
    return {model_id for v in versions if (model_id := _version_model_id(v))}


def _version_model_id(version: Any) -> str | None:
    """The LoggedModel behind a model version (its `model_id`, or its `models:/m-...` source)."""
    model_id = getattr(version, "model_id", None)
    if model_id:
        return str(model_id)
    source = str(version.source or "")
    return source.removeprefix("models:/") if source.startswith("models:/m-") else None


@task(task_run_name="make-room-{name}")
def make_room_for_model(
    model_uri: str,
    name: str,
    servers_dir: Path,
    store: ModelStore,
    memory_budget_gb: float | None = None,
) -> RoomReport:
    """Before loading `model_uri` to validate it (in this process or a fresh one), make sure it
    fits in memory.

    Validating a new version loads it beside the running servers, the old version of the same
    model included: for Phi-3-mini's transformers wrapper that is 7.7 GB on top of every
    server. If it cannot fit under the budget and the available memory, the server of `name`
    (the version being replaced) is stopped first, with the gap reported, rather than letting
    the kernel pick a victim; if it cannot fit even then, this is an error and nothing is
    stopped.
    """
    import gc

    if model_uri.removeprefix("models:/") in _registered_model_ids(name, store):
        # Registered by an earlier run, so validated then: its validation is a cache hit
        # and loads nothing (a re-run must not stop a server for nothing).
        return RoomReport()
    gc.collect()  # the previous model validated in this process, if cycles still hold it
    plan = plan_server_switch(servers_dir, name, model_uri, store, memory_budget_gb)
    logger = get_run_logger()
    if plan.order == "refuse":
        raise ServingError(f"{name}: cannot load {model_uri} to validate it: {plan.describe()}")
    if plan.order == "blue-green":
        logger.info("%s: room to validate %s beside the servers: %s", name, model_uri,
                    plan.describe())  # fmt: skip
        return RoomReport(plan=plan)
    logger.warning(
        "%s: to validate %s, %s", name, model_uri, plan.describe().replace("new one", "new version")
    )
    stopped = stop_server(servers_dir, name)
    return RoomReport(plan=plan, stopped=stopped.handle)


@task(retries=1, retry_delay_seconds=5, task_run_name="serve-{spec.name}")
def serve_model(spec: ModelServerSpec, servers_dir: Path, store: ModelStore) -> ServeResult:
    """Serve `spec.model_uri` as `spec.name`: reuse a healthy server of the same URI, else
    start, check, switch.

    Before starting, the running servers (each at max(measured RSS, its model's files)) plus
    the new model's expected size are checked against `spec.memory_budget_gb` and the
    available memory (`slmops.serving_memory`): if both servers cannot be up at once, the old one is stopped
    first (reported as a gap in service); if even that cannot fit, nothing is started and the
    old server keeps serving.

    Args:
        spec: the model, its name and kind, where it is served and within what limits.
        servers_dir: where the servers' state files and logs live.
        store: the MLflow store the model is loaded from.
    """
    logger = get_run_logger()
    name, kind, smoke_question = spec.name, spec.kind, spec.smoke_question
    host, startup_timeout_s = spec.host, spec.startup_timeout_s
    # Two runs serving `name` at once would both replace the same old server and one new server
    # would be left running, in no state file; the second run waits and then replaces the first.
    with serving_lock(servers_dir, name):
        # An alias (`models:/name@champion`) is resolved only now, so the run that serves last
        # serves the alias's version as of then, whichever run moved the alias last.
        model_uri, alias = resolve_alias(spec.model_uri, store), alias_of(spec.model_uri)
        current = status_of(servers_dir, name)
        if current.state == "serving" and current.handle and current.handle.model_uri == model_uri:
            # Proven by the smoke question when it was started: a health check is enough (a
            # question to bf16 Phi-3-mini on 2 cores takes ~60 s of a cached re-run).
            check_health(current.handle)
            logger.info("%s already serves %s on %s", name, model_uri, current.handle.url)
            reused = current.handle
            if reused.alias != alias:  # the same version, now served as another alias
                reused = reused.model_copy(update={"alias": alias})
                write_handle(servers_dir, reused)
            return ServeResult(handle=reused, answer=None, reused=True)
        plan = plan_server_switch(servers_dir, name, model_uri, store, spec.memory_budget_gb)
        if plan.order == "refuse":
            raise ServingError(f"{name}: {plan.describe()}")
        old_running = current.handle is not None and is_running(current.handle)
        if plan.order == "stop-first" and current.handle is not None:
            logger.warning("%s: %s", name, plan.describe())
            terminate(current.handle)
        else:
            logger.info("%s: %s", name, plan.describe())
        port = choose_port(host, spec.base_port, spec.slot, current.handle)
        try:
            handle = launch_server(
                model_uri, name, kind, host, port, servers_dir, store, startup_timeout_s,
                spec.request_timeout_s, alias,
            )  # fmt: skip
            try:
                answer = check_server(handle, smoke_question)
            except Exception:
                terminate(handle)  # in blue/green order the old server keeps serving
                raise
        except Exception:
            if plan.order == "stop-first" and current.handle is not None and old_running:
                _restart_replaced(current.handle, servers_dir, store, startup_timeout_s)
            raise
        write_handle(servers_dir, handle)
        if current.handle is not None:
            terminate(current.handle)
    logger.info(
        "%s: %s serving on %s (answer to %r: %r)",
        name,
        model_uri,
        handle.url,
        smoke_question,
        answer,
    )
    return ServeResult(handle=handle, answer=answer, replaced=current.handle, switch=plan)


def _restart_replaced(
    old: ServerHandle, servers_dir: Path, store: ModelStore, startup_timeout_s: float
) -> None:
    """Best effort after a failed stop-first switch: serve the old version again."""
    try:
        restarted = launch_server(
            old.model_uri, old.name, old.model_kind, old.host, old.port, servers_dir,
            store, startup_timeout_s, old.request_timeout_s, old.alias,
        )  # fmt: skip
    except ServingError:
        get_run_logger().exception("%s: could not restart %s", old.name, old.model_uri)
        return
    write_handle(servers_dir, restarted)


def served_names(servers_dir: Path) -> list[str]:
    """Names of every model server with a state file (whatever kinds a flow was asked about)."""
    return sorted(model_servers(servers_dir))


def stop_server(servers_dir: Path, name: str) -> ServerStatus:
    """Stop the server of `name` (a model server or the front door) and forget it."""
    with serving_lock(servers_dir, name):
        handle = read_handle(servers_dir, name)
        if handle is None:
            return ServerStatus(name=name, state="absent")
        terminate(handle)
        state_path(servers_dir, name).unlink(missing_ok=True)
    return ServerStatus(name=name, state="absent", handle=handle, detail="stopped")


def describe(status: ServerStatus) -> dict[str, Any]:
    """A flat, JSON-friendly row for tables and CLI output (model servers and the front door)."""
    return status.row()


# The OpenAI-compatible front door (`slmops.front_door`): one process in front of every served
# chat model, with its own state file. It reads the models' state files per request, so it
# outlives blue/green switches and keeps one address.


@task(retries=1, retry_delay_seconds=5, task_run_name="serve-front-door")
def serve_front_door(
    servers_dir: Path, host: str, port: int | None, startup_timeout_s: float
) -> ServerHandle:
    """Run the OpenAI-compatible front door over the chat models in `servers_dir`.

    A healthy front door on the same host (and port, when one is given) is reused. Otherwise it
    is (re)started, on its previous port when `port` is None and that port is free, so clients
    keep one address across restarts. Under the same lock as model servers: two runs never
    start two front doors.
    """
    logger = get_run_logger()
    with serving_lock(servers_dir, FRONT_DOOR):
        current = status_of(servers_dir, FRONT_DOOR)
        if (
            current.state == "serving"
            and current.handle is not None
            and current.handle.host == host
            and port in (None, current.handle.port)
        ):
            logger.info("front door already serving %s", current.detail)
            return current.handle
        if current.handle is not None:
            terminate(current.handle)
        if port is None:
            previous = (
                current.handle.port if current.handle and current.handle.host == host else None
            )
            port = previous if previous and _port_is_free(host, previous) else _free_port(host)
        servers_dir.mkdir(parents=True, exist_ok=True)
        log_path = servers_dir / f"{FRONT_DOOR}-{port}.log"
        cmd = [
            sys.executable, "-m", "slmops.front_door",
            "--servers-dir", str(servers_dir.resolve()), "--host", host, "--port", str(port),
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k not in HUB_TOKEN_VARIABLES}
        handle = _spawn_server(
            cmd, env, log_path, "/health", startup_timeout_s, "the front door",
            name=FRONT_DOOR, host=host, port=port,
        )  # fmt: skip
        write_handle(servers_dir, handle)
    logger.info("front door serving %s", status_of(servers_dir, FRONT_DOOR).detail)
    return handle
