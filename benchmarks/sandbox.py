"""An isolated place to run the release flow as operators do: a subprocess with its own state.

A `ReleaseSandbox` owns a fresh `SLMOPS_HOME` and `PREFECT_HOME` under a temp folder, runs
`python -m flows.release deployments/local.yaml` there, reads back what each task did (from the
temporary Prefect server's database and the log lines), and stops the model servers on exit,
with `python -m flows.serve stop` first and, as a safety net, by the pids in the state files.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.recording import REPO_ROOT

DEPLOYMENT = "deployments/local.yaml"
# Prefect names task runs `<task>-<3 hex digits>` unless the task sets task_run_name.
RUN_SUFFIX = re.compile(r"-[0-9a-f]{3}$")
_FINISHED = re.compile(
    r"^(?P<clock>\d\d:\d\d:\d\d\.\d+) \| \w+ +\| Task run '(?P<name>[^']+)' - "
    r"Finished in state (?P<state>\w+)"
)


@dataclass(frozen=True)
class TaskTiming:
    name: str  # task run name, e.g. export_onnx-cd9
    task: str  # task name, e.g. export_onnx
    state: str  # Completed, Cached, Failed...
    duration_s: float | None


@dataclass(frozen=True)
class ReleaseRun:
    """One release flow subprocess."""

    returncode: int
    wall_s: float  # process start to exit
    startup_s: float | None  # process start to flow run start: imports + temporary server
    flow_s: float | None  # the flow run itself, as the Prefect server recorded it
    tasks: tuple[TaskTiming, ...]
    log_tail: str

    @property
    def teardown_s(self) -> float | None:
        """Flow run end to process exit: stopping the temporary server, interpreter exit."""
        if self.startup_s is None or self.flow_s is None:
            return None
        return round(self.wall_s - self.startup_s - self.flow_s, 3)

    def by_task(self) -> dict[str, dict[str, Any]]:
        """Seconds and states per task name, summed over that task's runs."""
        summary: dict[str, dict[str, Any]] = {}
        for t in self.tasks:
            entry = summary.setdefault(t.task, {"runs": 0, "seconds": 0.0, "states": []})
            entry["runs"] += 1
            entry["seconds"] += t.duration_s or 0.0
            if t.state not in entry["states"]:
                entry["states"].append(t.state)
        return summary


def bench_env(home: Path, prefect_home: Path) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PREFECT_", "MLFLOW_")) and key not in ("HF_TOKEN", "HF_ENDPOINT")
    }
    env.update(
        SLMOPS_HOME=str(home),
        PREFECT_HOME=str(prefect_home),
        DO_NOT_TRACK="true",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        HF_HUB_DISABLE_TELEMETRY="1",
        TOKENIZERS_PARALLELISM="false",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    return env


def _db_time(text: str | None) -> float | None:
    if not text:
        return None
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def _interval_s(text: str | None) -> float | None:
    # Prefect stores intervals as an offset from the epoch: '1970-01-01 00:00:07.767010'.
    stamp = _db_time(text)
    return stamp if stamp is None else round(stamp, 3)


class ReleaseSandbox:
    """Fresh SLMOPS_HOME + PREFECT_HOME; `run()` the release there as often as needed."""

    def __init__(self, label: str, prebuilt_embedded: Path | None = None, keep: bool = False):
        self.root = Path(tempfile.mkdtemp(prefix=f"slmops-bench-{label}-"))
        self.home = self.root / "home"
        self.prefect_home = self.root / "prefect"
        self.keep = keep
        self.env = bench_env(self.home, self.prefect_home)
        self._prefect_server: subprocess.Popen[bytes] | None = None
        if prebuilt_embedded is not None:
            # The flow builds the embedded repos under $SLMOPS_HOME/cache/embedded; a copy of a
            # prebuilt one makes "cold" mean a cold pipeline, not a model build.
            shutil.copytree(prebuilt_embedded, self.home / "cache" / "embedded", symlinks=True)

    def __enter__(self) -> ReleaseSandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, timeout_s: float = 1200.0) -> ReleaseRun:
        log_path = self.root / f"release-{time.time_ns()}.log"
        started = time.time()
        t0 = time.perf_counter()
        with open(log_path, "wb") as log:
            proc = subprocess.run(
                [sys.executable, "-m", "flows.release", DEPLOYMENT],
                cwd=REPO_ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=timeout_s,
                check=False,
            )
        wall = time.perf_counter() - t0
        text = log_path.read_text(errors="replace")
        flow_start, flow_s, db_tasks = self.flow_run_record()
        log_tasks = _finished_lines(text)
        tasks = []
        for name, state, approx_s in log_tasks:
            duration = db_tasks.get(name, approx_s)
            tasks.append(TaskTiming(name, RUN_SUFFIX.sub("", name), state, duration))
        return ReleaseRun(
            returncode=proc.returncode,
            wall_s=wall,
            startup_s=None if flow_start is None else round(flow_start - started, 3),
            flow_s=flow_s,
            tasks=tuple(tasks),
            log_tail="\n".join(text.splitlines()[-15:]),
        )

    def flow_run_record(self) -> tuple[float | None, float | None, dict[str, float | None]]:
        """The latest flow run's start, its duration and its task durations, from prefect.db."""
        db = self.prefect_home / "prefect.db"
        if not db.exists():
            return None, None, {}
        try:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
                row = conn.execute(
                    "select id, start_time, total_run_time from flow_run "
                    "order by start_time desc limit 1"
                ).fetchone()
                if row is None:
                    return None, None, {}
                tasks = {
                    name: _interval_s(total)
                    for name, total in conn.execute(
                        "select name, total_run_time from task_run where flow_run_id = ?",
                        (row[0],),
                    )
                }
        except sqlite3.Error:
            return None, None, {}
        return _db_time(row[1]), _interval_s(row[2]), tasks

    def server_handles(self) -> list[Any]:
        """The model servers' handles (other state files, e.g. a front door's, are skipped)."""
        from pydantic import ValidationError

        from tasks.serving import ServerHandle

        handles = []
        for path in sorted((self.home / "servers").glob("*.json")):
            try:
                handles.append(ServerHandle.model_validate_json(path.read_text()))
            except ValidationError:
                continue
        return handles

    def stop_servers(self) -> None:
        servers = self.home / "servers"
        if not servers.is_dir():
            return
        subprocess.run(
            [sys.executable, "-m", "flows.serve", "stop"],
            cwd=REPO_ROOT,
            env=self.env,
            capture_output=True,
            timeout=300,
            check=False,
        )
        for path in servers.glob("*.json"):  # what `serve stop` left, if it failed
            stop_process_group(json.loads(path.read_text()))

    def start_prefect_server(self, timeout_s: float = 120.0) -> str:
        """Start a persistent `prefect server start` (as deployments use) and point runs at it,
        so that they no longer start a temporary server each; returns its API URL."""
        import httpx

        from tasks.serving import _free_port

        port = _free_port("127.0.0.1")
        with open(self.root / "prefect-server.log", "ab") as log:
            self._prefect_server = subprocess.Popen(
                [str(Path(sys.executable).parent / "prefect"), "server", "start",
                 "--host", "127.0.0.1", "--port", str(port)],
                cwd=self.root, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        url = f"http://127.0.0.1:{port}/api"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._prefect_server.poll() is not None:
                raise RuntimeError(f"prefect server exited with {self._prefect_server.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2.0).status_code == 200:
                    self.env["PREFECT_API_URL"] = url
                    return url
            time.sleep(0.5)
        self._stop_prefect_server()
        raise RuntimeError(f"prefect server not healthy on {url} after {timeout_s:.0f} s")

    def _stop_prefect_server(self) -> None:
        server, self._prefect_server = self._prefect_server, None
        self.env.pop("PREFECT_API_URL", None)
        if server is None or server.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=15)

    def close(self) -> None:
        try:
            self.stop_servers()
        finally:
            self._stop_prefect_server()
        if not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)


def stop_process_group(state: dict[str, Any], grace_s: float = 10.0) -> None:
    """Stop the process group a server state file names, if that process is still the same one
    (pid and start time; any state file with `pid` and `process_started`)."""
    import psutil

    pid, started = state.get("pid"), state.get("process_started")
    if not isinstance(pid, int) or not isinstance(started, int | float):
        return
    try:
        process = psutil.Process(pid)
        if abs(process.create_time() - started) >= 1.0:
            return
        os.killpg(pid, signal.SIGTERM)
        process.wait(timeout=grace_s)
    except psutil.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    except (psutil.NoSuchProcess, ProcessLookupError, PermissionError):
        pass


def _finished_lines(text: str) -> list[tuple[str, str, float | None]]:
    """(task run name, final state, seconds since the previous task finished) per log line.

    The seconds are an approximation (tasks run one after another in this flow), used only
    when the Prefect database has no record of the task run.
    """
    found = []
    previous: float | None = None
    for line in text.splitlines():
        match = _FINISHED.match(line)
        if not match:
            continue
        h, m, s = match["clock"].split(":")
        clock = int(h) * 3600 + int(m) * 60 + float(s)
        approx = None if previous is None else round(clock - previous, 3)
        previous = clock
        found.append((match["name"], match["state"], approx))
    return found


def prebuilt_embedded() -> Path:
    """The embedded repos built once into the bench cache (what the flow builds in ~20 s)."""
    from benchmarks.midsize import bench_cache
    from offline_kit.embedded import ensure_embedded_repos

    folder = bench_cache() / "embedded"
    ensure_embedded_repos(folder)
    return folder
