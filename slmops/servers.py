"""One state model for every server slmops runs: the model servers and the front door.

Each server has a state file `<servers_dir>/<name>.json` holding its `ServerHandle`: written by
`tasks.serving` (atomically: readers see the old server or the new one, never half a file),
read by the serve flow, the front door and the tests. The handle's `kind` tells a model server
(a WrapperKind) from the front door (None). The `/invocations` body of a sample question and
the answer text in a response are defined here too, so that every caller asks alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from slmops.config import DEFAULT_REQUEST_TIMEOUT_S, WrapperKind
from slmops.errors import ExplainedError
from slmops.families import PHI3, ChatFamily

FRONT_DOOR = "front-door"
ServerState = Literal["serving", "unhealthy", "dead", "absent"]


class ServingError(ExplainedError):
    """A server did not start, did not become healthy, or answered wrongly."""


class ServerHandle(BaseModel):
    """A managed server process: enough to find, call and stop it."""

    model_config = ConfigDict(frozen=True)

    name: str
    host: str
    port: int
    pid: int
    process_started: float  # with the pid, tells our process from a later one reusing the pid
    log_path: Path
    started_at: str
    kind: WrapperKind | None = None  # None: the front door
    model_uri: str = ""  # the registered version served (models:/name/<version>)
    alias: str = ""  # the registry alias it was served as (e.g. champion); "" if none
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S  # the server's limit per request
    # The served ONNX chat model's token stream (`POST /stream`, newline-delimited chunks), on
    # a second port of the same process: MLflow's scoring server cannot stream. None: no stream.
    stream_port: int | None = None

    @property
    def stream_url(self) -> str | None:
        return f"http://{self.host}:{self.stream_port}/stream" if self.stream_port else None

    @property
    def version(self) -> str:
        """The registry version served ("3" of models:/name/3); "" for any other URI."""
        if not self.model_uri.startswith("models:/") or "@" in self.model_uri:
            return ""
        ref = self.model_uri.removeprefix("models:/")
        return ref.rsplit("/", 1)[-1] if "/" in ref else ""

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def is_front_door(self) -> bool:
        return self.kind is None

    @property
    def health_url(self) -> str:
        return f"{self.url}/health" if self.is_front_door else f"{self.url}/ping"

    @property
    def openai_base_url(self) -> str:
        return f"{self.url}/v1"

    @property
    def model_kind(self) -> WrapperKind:
        """The kind of a model server (an error for the front door, which serves none)."""
        if self.kind is None:
            raise ServingError(f"{self.name} is the front door, not a model server")
        return self.kind


class ServerStatus(BaseModel):
    """What a server's state file and the process say now."""

    model_config = ConfigDict(frozen=True)

    name: str
    state: ServerState
    handle: ServerHandle | None = None
    detail: str = ""

    def row(self) -> dict[str, Any]:
        """A flat, JSON-friendly row for tables and command-line output."""
        handle = self.handle
        return {
            "name": self.name,
            "state": self.state,
            "url": handle.url if handle else "",
            "model_uri": handle.model_uri if handle else "",
            "pid": handle.pid if handle else None,
            "detail": self.detail,
        }


def state_path(servers_dir: Path, name: str) -> Path:
    return servers_dir / f"{name}.json"


def read_handle(servers_dir: Path, name: str) -> ServerHandle | None:
    """The handle in `name`'s state file, or None if there is none."""
    path = state_path(servers_dir, name)
    try:
        return ServerHandle.model_validate_json(path.read_text())
    except FileNotFoundError:
        return None


def write_handle(servers_dir: Path, handle: ServerHandle) -> None:
    path = state_path(servers_dir, handle.name)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(handle.model_dump_json(indent=2))
    tmp.replace(path)  # atomic: readers see the old or the new server, never half a file


def server_names(servers_dir: Path) -> list[str]:
    """Names of every server with a state file, the front door included."""
    if not servers_dir.exists():
        return []
    return sorted(p.stem for p in servers_dir.glob("*.json"))


def model_servers(servers_dir: Path) -> dict[str, ServerHandle]:
    """Registered name -> handle of every model server with a state file."""
    handles = {}
    for name in server_names(servers_dir):
        try:
            handle = read_handle(servers_dir, name)
        except (OSError, ValueError):
            continue  # mid-removal, or not a state file of ours
        if handle is not None and not handle.is_front_door:
            handles[name] = handle
    return handles


def sample_request(
    kind: WrapperKind, question: str, max_tokens: int, family: ChatFamily = PHI3
) -> dict[str, Any]:
    """The `/invocations` body of one question for a served model of `kind`."""
    if kind is WrapperKind.PROMPT_ONNX:
        return {"dataframe_records": [{"prompt": family.render(question)}]}
    return {"messages": [{"role": "user", "content": question}], "max_tokens": max_tokens}


def answer_text(kind: WrapperKind, body: Any) -> str:
    """The generated text in an `/invocations` response of a model of `kind`."""
    predictions = body.get("predictions", body) if isinstance(body, dict) else body
    first = predictions[0] if isinstance(predictions, list) else predictions
    if kind is WrapperKind.PROMPT_ONNX:
        if not isinstance(first, str):
            raise ServingError(f"expected a string prediction, got {first!r}")
        return first
    try:
        return str(first["choices"][0]["message"]["content"])
    except (KeyError, IndexError, TypeError) as exc:
        raise ServingError(f"not a chat completion: {first!r}") from exc
