"""The scaled-out slmops on one machine: the shared services, and workers as separate "hosts".

Started from Python (`subprocess.Popen`, each in its own process group), health-checked, and
torn down in reverse order:
- PostgreSQL 15 (a temporary `initdb` cluster on a free port) with a `prefect` and an `mlflow`
  database;
- an S3-compatible server (`moto[server]`) with the artifact bucket, reached through `S3Relay`,
  a TCP relay the stack can cut to take "S3" down for a moment;
- `prefect server` on PostgreSQL (asyncpg);
- `mlflow server` with the PostgreSQL backend store and `--artifacts-destination s3://...`:
  workers and model servers read and write artifacts through it (`mlflow-artifacts:/`), so
  only the tracking server holds S3 credentials;
- process work pools `slmops-process` (releases) and `slmops-serving` (the long-lived serving
  host: rollbacks and the model servers), the deployments of
  `deployments/scale-out/process.yaml`, and one worker per host, each with its own
  SLMOPS_HOME, TMPDIR and PREFECT_HOME: no local disk is shared.

`python -m offline_kit.scale_out_stack up` starts it, prints the addresses and waits (Ctrl-C
tears it down). Tests use `ScaleOutStack` as a context manager.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
PG_BIN = Path(os.environ.get("SLMOPS_PG_BIN", "/usr/local/bin"))
BUCKET = "slmops-artifacts"
RELEASE_POOL = "slmops-process"
SERVING_POOL = "slmops-serving"
DEPLOYMENTS_FILE = ROOT / "deployments" / "scale-out" / "process.yaml"
S3_KEYS = {
    "AWS_ACCESS_KEY_ID": "slmops",
    "AWS_SECRET_ACCESS_KEY": "slmops-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


HEARTBEAT_S = 30  # flow-run heartbeat period on the stack's hosts (Prefect's minimum)
ZOMBIE_AFTER_S = 75  # no heartbeat for this long (two and a half periods): set Crashed


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(check: Callable[[], bool], timeout_s: float, what: str, proc=None) -> None:
    """Poll `check` until it holds; fail early if `proc` exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with {proc.returncode}")
        with contextlib.suppress(Exception):
            if check():
                return
        time.sleep(0.3)
    raise TimeoutError(f"{what} not ready after {timeout_s:.0f} s")


def http_ok(url: str) -> Callable[[], bool]:
    return lambda: httpx.get(url, timeout=2).status_code == 200


class S3Relay:
    """A TCP relay in front of the S3 server; `cut()` drops every connection and refuses new
    ones until `restore()`, as an S3 endpoint that is briefly unreachable does."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._up = threading.Event()
        self._up.set()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._listener.settimeout(0.2)
        self._thread = threading.Thread(target=self._accept, name="s3-relay", daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cut(self) -> None:
        self._up.clear()
        with self._lock:
            for sock in self._open:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def restore(self) -> None:
        self._up.set()

    def close(self) -> None:
        self._stop.set()
        self.cut()
        self._thread.join(5)
        self._listener.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if not self._up.is_set():
                client.close()  # refused: the client sees a reset, as from a host that is down
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._open.update((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            with self._lock:
                self._open.discard(source)


@dataclass
class Host:
    """One worker "host": its own SLMOPS_HOME, TMPDIR and PREFECT_HOME."""

    name: str
    pool: str
    root: Path
    proc: subprocess.Popen | None = None

    @property
    def slmops_home(self) -> Path:
        return self.root / "slmops"


@dataclass
class ScaleOutStack:
    """Start with `with ScaleOutStack(folder) as stack:`; everything is stopped on exit.

    Args:
        folder: where logs and the hosts' folders go (PostgreSQL's data goes to a temp folder
            the `postgres` user can reach when run as root).
        release_hosts: names of the workers on the release pool.
        worker_env: extra environment for every worker (and the flow runs they start).
    """

    folder: Path
    release_hosts: Sequence[str] = ("host-a", "host-b")
    worker_env: dict[str, str] = field(default_factory=dict)
    processes: list[tuple[str, subprocess.Popen]] = field(default_factory=list)
    hosts: dict[str, Host] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.folder = Path(self.folder)
        self.logs = self.folder / "logs"
        self.pg_port = free_port()
        self.s3_port = free_port()
        self.prefect_port = free_port()
        self.mlflow_port = free_port()
        self.pg_root: Path | None = None
        self.relay: S3Relay | None = None

    # -- addresses -----------------------------------------------------------------------------

    def pg_url(self, database: str, driver: str = "postgresql") -> str:
        return f"{driver}://slmops@127.0.0.1:{self.pg_port}/{database}"

    @property
    def prefect_api(self) -> str:
        return f"http://127.0.0.1:{self.prefect_port}/api"

    @property
    def tracking_uri(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    @property
    def artifact_root(self) -> str:
        return f"s3://{BUCKET}/mlflow"

    def base_env(self) -> dict[str, str]:
        """What every process of the stack shares: no analytics, no telemetry."""
        return {
            **os.environ,
            "DO_NOT_TRACK": "true",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PYTHONPATH": str(ROOT),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        }

    def client_env(self, host_root: Path) -> dict[str, str]:
        """The environment of a process on one host: the shared services, its own disk."""
        (host_root / "tmp").mkdir(parents=True, exist_ok=True)
        return {
            **self.base_env(),
            "PREFECT_API_URL": self.prefect_api,
            "PREFECT_HOME": str(host_root / "prefect"),
            "MLFLOW_TRACKING_URI": self.tracking_uri,
            "SLMOPS_HOME": str(host_root / "slmops"),
            "SLMOPS_REGISTRY_LOCKS": "prefect",
            # Flow runs send heartbeats; the stack's automation crashes one whose heartbeats
            # stop (its host died), so that any host can settle what it left.
            "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_S),
            "TMPDIR": str(host_root / "tmp"),
            "PWD": str(ROOT),
        }

    # -- lifecycle -----------------------------------------------------------------------------

    def __enter__(self) -> ScaleOutStack:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        began = time.monotonic()
        for step in (
            self._start_postgres,
            self._start_s3,
            self._start_prefect,
            self._start_mlflow,
            self._deploy,
        ):
            t0 = time.monotonic()
            step()
            self.timings[step.__name__.removeprefix("_")] = round(time.monotonic() - t0, 1)
        t0 = time.monotonic()
        for name in self.release_hosts:
            self.start_worker(name, RELEASE_POOL)
        self.start_worker("serving-host", SERVING_POOL)
        self.timings["start_workers"] = round(time.monotonic() - t0, 1)
        self.timings["total"] = round(time.monotonic() - began, 1)

    def _spawn(
        self,
        label: str,
        cmd: list[str],
        env: dict[str, str],
        user: str | None = None,
        cwd: Path = ROOT,
    ) -> subprocess.Popen:
        log = open(self.logs / f"{label}.log", "ab")  # noqa: SIM115 - the child holds it
        proc = subprocess.Popen(
            cmd,
            env=env,
            cwd=cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            user=user,
        )
        log.close()
        self.processes.append((label, proc))
        return proc

    def _start_postgres(self) -> None:
        # initdb and postgres refuse to run as root: as root, they run as the `postgres` user,
        # in a folder of their own that user can reach.
        as_root = os.geteuid() == 0
        user = "postgres" if as_root else None
        self.pg_root = Path(tempfile.mkdtemp(prefix="slmops-pg-"))
        data = self.pg_root / "data"
        data.mkdir()
        if as_root:
            self.pg_root.chmod(0o711)
            entry = pwd.getpwnam("postgres")
            os.chown(data, entry.pw_uid, entry.pw_gid)
        env = {**os.environ, "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"}
        subprocess.run(
            [str(PG_BIN / "initdb"), "-D", str(data), "-U", "slmops", "--auth=trust", "-E", "UTF8"],
            env=env,
            user=user,
            check=True,
            capture_output=True,
            cwd=self.pg_root,
        )
        proc = self._spawn(
            "postgres",
            [
                str(PG_BIN / "postgres"),
                "-D",
                str(data),
                "-p",
                str(self.pg_port),
                "-h",
                "127.0.0.1",
                "-c",
                "unix_socket_directories=",
                "-c",
                "max_connections=200",
                "-c",
                "fsync=off",
            ],  # fmt: skip
            env,
            user=user,
            cwd=self.pg_root,
        )
        import psycopg2

        def accepts() -> bool:
            psycopg2.connect(self.pg_url("postgres")).close()
            return True

        wait_until(accepts, 60, "postgres", proc)
        connection = psycopg2.connect(self.pg_url("postgres"))
        connection.autocommit = True
        with connection.cursor() as cursor:
            for database in ("prefect", "mlflow"):
                cursor.execute(f"CREATE DATABASE {database}")
        connection.close()

    def _start_s3(self) -> None:
        proc = self._spawn(
            "s3",
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.s3_port)],
            self.base_env(),
        )
        wait_until(http_ok(f"http://127.0.0.1:{self.s3_port}/moto-api/"), 60, "moto", proc)
        self.relay = S3Relay(self.s3_port)
        self.s3_client().create_bucket(Bucket=BUCKET)

    def s3_client(self) -> Any:
        """A boto3 S3 client of the stack's store, through the relay (which tests can cut)."""
        import boto3

        assert self.relay is not None, "S3 is not started"
        return boto3.client(
            "s3",
            endpoint_url=self.relay.endpoint,
            aws_access_key_id=S3_KEYS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=S3_KEYS["AWS_SECRET_ACCESS_KEY"],
            region_name=S3_KEYS["AWS_DEFAULT_REGION"],
        )

    def _start_prefect(self) -> None:
        env = {
            **self.base_env(),
            "PREFECT_HOME": str(self.folder / "prefect-server"),
            "PREFECT_API_DATABASE_CONNECTION_URL": self.pg_url("prefect", "postgresql+asyncpg"),
            # Expired registry-lock leases (a dead host's) are reclaimed within seconds.
            "PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS": "5",
        }
        proc = self._spawn(
            "prefect-server",
            [
                sys.executable,
                "-m",
                "prefect",
                "server",
                "start",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.prefect_port),
                "--no-ui",
            ],  # fmt: skip
            env,
        )
        wait_until(http_ok(f"{self.prefect_api}/health"), 180, "prefect server", proc)

    def _start_mlflow(self) -> None:
        assert self.relay is not None
        env = {**self.base_env(), **S3_KEYS, "MLFLOW_S3_ENDPOINT_URL": self.relay.endpoint}
        proc = self._spawn(
            "mlflow-server",
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.mlflow_port),
                "--workers",
                "2",
                "--backend-store-uri",
                self.pg_url("mlflow", "postgresql+psycopg2"),
                "--artifacts-destination",
                self.artifact_root,
            ],  # fmt: skip
            env,
        )
        wait_until(http_ok(f"{self.tracking_uri}/health"), 240, "mlflow server", proc)

    def prefect(self, *args: str, timeout_s: float = 180) -> str:
        """Run a `prefect` command against the stack's API; its output, or an error."""
        env = self.client_env(self.folder / "operator")
        done = subprocess.run(
            [sys.executable, "-m", "prefect", *args],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        if done.returncode != 0:
            raise RuntimeError(f"prefect {' '.join(args)}: {done.stdout}\n{done.stderr}")
        return done.stdout

    def _deploy(self) -> None:
        for pool in (RELEASE_POOL, SERVING_POOL):
            self.prefect("work-pool", "create", pool, "--type", "process")
        self.prefect("--no-prompt", "deploy", "--all", "--prefect-file", str(DEPLOYMENTS_FILE))
        from prefect.settings import PREFECT_API_URL, temporary_settings

        from tasks.release_records import ensure_zombie_automation

        with temporary_settings({PREFECT_API_URL: self.prefect_api}):
            ensure_zombie_automation(within_s=ZOMBIE_AFTER_S)

    def start_worker(self, name: str, pool: str) -> Host:
        """Start (or restart) the worker of host `name` on `pool`."""
        host = self.hosts.get(name) or Host(name=name, pool=pool, root=self.folder / name)
        # A queue of the host's own, beside `default`: a run can be pinned to one host.
        queue = httpx.post(
            f"{self.prefect_api}/work_pools/{pool}/queues", json={"name": name}, timeout=30
        )
        if queue.status_code not in (201, 409):
            queue.raise_for_status()
        env = {
            **self.client_env(host.root),
            "PREFECT_WORKER_QUERY_SECONDS": "1",
            "PREFECT_WORKER_PREFETCH_SECONDS": "1",
            **self.worker_env,
        }
        host.proc = self._spawn(
            name,
            [
                sys.executable,
                "-m",
                "prefect",
                "worker",
                "start",
                "--pool",
                pool,
                "--name",
                name,
                "--work-queue",
                "default",
                "--work-queue",
                name,
            ],  # fmt: skip
            env,
        )
        self.hosts[name] = host

        def polling() -> bool:
            workers = httpx.post(
                f"{self.prefect_api}/work_pools/{pool}/workers/filter", json={}, timeout=5
            ).json()
            return any(w["name"] == name for w in workers)

        wait_until(polling, 60, f"worker {name}", host.proc)
        return host

    def kill_host(self, name: str) -> list[int]:
        """SIGKILL a worker and every process under it, as when its machine dies."""
        host = self.hosts[name]
        assert host.proc is not None
        try:
            tree = [psutil.Process(host.proc.pid)]
            tree += tree[0].children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        for process in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        host.proc.wait(10)
        return [p.pid for p in tree]

    def stop(self) -> None:
        """Stop everything started, newest first: each process group TERM, then KILL; then
        what the hosts' flow runs started in sessions of their own (model servers)."""
        for label, proc in reversed(self.processes):
            _stop_group(proc, label)
        self.processes.clear()
        for process in self.host_processes():
            with contextlib.suppress(psutil.Error):
                process.kill()
        if self.relay is not None:
            self.relay.close()
            self.relay = None
        if self.pg_root is not None:
            shutil.rmtree(self.pg_root, ignore_errors=True)
            self.pg_root = None

    def host_processes(self) -> list[psutil.Process]:
        """Processes whose SLMOPS_HOME is one of this stack's hosts' (flow runs, model servers)."""
        homes = {str(host.slmops_home) for host in self.hosts.values()}
        found = []
        for process in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                if process.environ().get("SLMOPS_HOME") in homes:
                    found.append(process)
        return found


def _stop_group(proc: subprocess.Popen, label: str, grace_s: float = 15.0) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace_s)
    # Whatever is left of the group (a worker's flow runs, a server's workers).
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


def main(argv: Sequence[str]) -> int:
    if list(argv[:1]) != ["up"]:
        print("usage: python -m offline_kit.scale_out_stack up [FOLDER]", file=sys.stderr)
        return 2
    folder = Path(argv[1]) if len(argv) > 1 else Path(tempfile.mkdtemp(prefix="slmops-stack-"))
    with ScaleOutStack(folder) as stack:
        print(f"PREFECT_API_URL={stack.prefect_api}")
        print(f"MLFLOW_TRACKING_URI={stack.tracking_uri}")
        print(f"artifacts: {stack.artifact_root} on {stack.relay.endpoint if stack.relay else ''}")
        print(f"hosts: {', '.join(f'{h.name} ({h.pool}): {h.root}' for h in stack.hosts.values())}")
        print(f"started in {stack.timings}; logs in {stack.logs}; Ctrl-C stops everything")
        signal.signal(signal.SIGTERM, _interrupt)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(1)
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM tears the stack down as Ctrl-C does


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
