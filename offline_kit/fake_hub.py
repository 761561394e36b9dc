"""A loopback Hugging Face Hub: serves local folders as model repos, with fault injection.

It implements the part of the Hub's HTTP API that `huggingface_hub` 2.4 uses to download
(`snapshot_download`, `hf_hub_download`, `HfApi.model_info(files_metadata=True)`,
`HfApi.list_repo_tree`), so the real client code path runs offline:

- `GET /api/models/{repo}[/revision/{rev}][?blobs=true]`: repo info (`sha`, `siblings`).
- `GET /api/models/{repo}/tree/{rev}[/{path}][?recursive=true]`: the tree listing that
  `snapshot_download` reads (and caches) before downloading.
- `HEAD|GET /{repo}/resolve/{rev}/{path}`: file metadata headers (`X-Repo-Commit`, `ETag`,
  `X-Linked-Etag`/`X-Linked-Size` for LFS files) and content, with `Range` support.

Files are served straight from disk with no redirect and no Xet headers, so the client always
takes its plain-HTTP download path. Each repo has one commit, derived from its files' contents;
`main` resolves to it. Every request is recorded (`FakeHub.count`) so tests can assert, e.g.,
that a cached fetch downloads nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from fnmatch import fnmatch
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qs, unquote, urlsplit

RequestKind = Literal["info", "tree", "head", "file", "unknown"]
METADATA_KINDS: frozenset[RequestKind] = frozenset({"info", "tree", "head"})

# Fault counts are "the first N matching requests"; ALWAYS never runs out.
ALWAYS = 1 << 62

# What the real repos track with Git LFS (their .gitattributes): big binary files.
DEFAULT_LFS_PATTERNS = (
    "*.safetensors",
    "*.bin",
    "*.pt",
    "*.pth",
    "*.onnx",
    "*.onnx.data",
    "*.onnx_data",
    "*.gguf",
    "*.h5",
    "*.msgpack",
    "*.model",
)

_CHUNK = 1 << 16


@dataclass(frozen=True)
class Faults:
    """Failures a `FakeHub` injects, for the whole hub or for one repo.

    Each count means "the first N matching requests" (`ALWAYS` for every one); counting starts
    when the faults are set. File faults are keyed by the file's path in the repo and apply to
    content GETs only, never to HEAD or metadata requests.

    Attributes:
        unavailable: answer 503 to the first N requests whose kind is in `unavailable_kinds`.
        unavailable_kinds: request kinds the 503s apply to ("info", "tree", "head", "file").
        hang: path -> N: the first N GETs of the file get no answer for `hang_s` seconds, then
            the connection is closed (set the client's timeout below `hang_s`).
        hang_s: how long a hung request waits (the hub's shutdown ends the wait early).
        cut: path -> N: the first N GETs send headers with the full Content-Length, then the
            body up to the file's midpoint only, then close the connection.
        corrupt: path -> N: the first N GETs serve the file with its first byte flipped, while
            every metadata answer still gives the true sha256 / blob id.
        gated_token: make the repo gated: file HEAD/GET answer 401 `GatedRepo` unless sent with
            `Authorization: Bearer <gated_token>` (repo info and tree stay public, as on the Hub).
    """

    unavailable: int = 0
    unavailable_kinds: frozenset[str] = frozenset({"info", "tree", "head", "file"})
    hang: Mapping[str, int] = field(default_factory=dict)
    hang_s: float = 5.0
    cut: Mapping[str, int] = field(default_factory=dict)
    corrupt: Mapping[str, int] = field(default_factory=dict)
    gated_token: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class HubRequest:
    """One request the hub answered (or dropped: status 0). Never holds the token itself."""

    method: str
    kind: RequestKind
    repo_id: str | None
    path: str | None
    status: int
    range: str | None
    authorized: bool  # sent an Authorization header
    fault: str | None = None  # the fault injected: "unavailable", "hang", "cut" or "corrupt"


@dataclass(frozen=True)
class _File:
    path: str
    source: Path
    size: int
    blob_id: str  # git blob sha1 of what git stores: the content, or the LFS pointer
    sha256: str
    pointer_size: int | None  # set for LFS files

    @property
    def is_lfs(self) -> bool:
        return self.pointer_size is not None

    @property
    def etag(self) -> str:
        return self.sha256 if self.is_lfs else self.blob_id


@dataclass(frozen=True)
class _Repo:
    repo_id: str
    commit: str
    files: dict[str, _File]

    def folders(self) -> list[str]:
        names = {"/".join(p.split("/")[:i]) for p in self.files for i in range(1, p.count("/") + 1)}
        return sorted(names)


def git_blob_sha1(data: bytes) -> str:
    """The id git gives a blob: sha1 over a `blob <size>\\0` header and the content."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return (
        f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()
    )


def _scan_file(path: str, source: Path, lfs_patterns: tuple[str, ...]) -> _File:
    size = source.stat().st_size
    sha256 = hashlib.sha256()
    blob = hashlib.sha1(b"blob %d\0" % size)
    with source.open("rb") as f:
        while chunk := f.read(1 << 20):
            sha256.update(chunk)
            blob.update(chunk)
    digest = sha256.hexdigest()
    if any(fnmatch(path.rsplit("/", 1)[-1], pattern) for pattern in lfs_patterns):
        pointer = _lfs_pointer(digest, size)
        return _File(path, source, size, git_blob_sha1(pointer), digest, len(pointer))
    return _File(path, source, size, blob.hexdigest(), digest, None)


def _scan_repo(repo_id: str, folder: Path, lfs_patterns: tuple[str, ...]) -> _Repo:
    if len(repo_id.split("/")) != 2:
        raise ValueError(f"repo id must look like 'owner/name', got {repo_id!r}")
    if not folder.is_dir():
        raise FileNotFoundError(f"no folder {folder} to serve as {repo_id}")
    files: dict[str, _File] = {}
    for source in sorted(folder.rglob("*")):
        rel = source.relative_to(folder)
        # Hidden files and folders (.git, .cache, ...) are not part of the repo's content.
        if not source.is_file() or any(part.startswith(".") for part in rel.parts):
            continue
        files[rel.as_posix()] = _scan_file(rel.as_posix(), source, lfs_patterns)
    if not files:
        raise ValueError(f"folder {folder} served as {repo_id} holds no files")
    listing = "".join(f"{f.blob_id} {f.path}\n" for f in files.values())
    commit = hashlib.sha1(b"slmops-fake-hub\n" + listing.encode()).hexdigest()
    return _Repo(repo_id, commit, files)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    hub: FakeHub

    def server_activate(self) -> None:
        super().server_activate()
        self.open_connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()

    def process_request(self, request, client_address) -> None:
        with self.connections_lock:
            self.open_connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request) -> None:
        with self.connections_lock:
            self.open_connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """End kept-alive connections, so their handler threads finish now."""
        with self.connections_lock:
            connections = list(self.open_connections)
        for connection in connections:
            with suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects from the Hub
    server: _Server

    def do_GET(self) -> None:
        self.server.hub._handle(self, "GET")

    def do_HEAD(self) -> None:
        self.server.hub._handle(self, "HEAD")

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        self.server.hub._handle(self, "POST")

    def log_message(self, format: str, *args: object) -> None:
        pass  # tests assert on FakeHub.requests; stderr noise helps no one


class _Reply(Exception):
    """An error answer, raised from deep in request handling."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: dict | None = None,
        fault: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers = headers or {}
        self.fault = fault


class FakeHub:
    """Serves local folders as Hugging Face model repos on 127.0.0.1 (an OS-chosen port).

    Use as a context manager; `endpoint` is what `huggingface_hub` calls take as `endpoint=`.

    Args:
        repos: repo id ("owner/name") -> folder whose files are the repo's content.
        faults: faults for every repo (see `Faults`); change later with `set_faults`.
        repo_faults: repo id -> faults for that repo only.
        lfs_patterns: file-name patterns served as LFS files (sha256 ETag, `lfs` metadata).
    """

    def __init__(
        self,
        repos: Mapping[str, Path],
        *,
        faults: Faults | None = None,
        repo_faults: Mapping[str, Faults] | None = None,
        lfs_patterns: tuple[str, ...] = DEFAULT_LFS_PATTERNS,
    ) -> None:
        self._repos = {
            repo_id: _scan_repo(repo_id, Path(folder), lfs_patterns)
            for repo_id, folder in repos.items()
        }
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._faults: dict[str | None, Faults] = {None: faults or Faults()}
        self._faults.update(repo_faults or {})
        self._fault_counts: Counter[tuple] = Counter()
        self._requests: list[HubRequest] = []
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> FakeHub:
        if self._server is not None:
            return self
        self._stop.clear()
        server = _Server(("127.0.0.1", 0), _Handler)
        server.hub = self
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.name = f"fake-hub-{self.port}"
        self._thread.start()
        return self

    def close(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        self._stop.set()  # ends hung requests early
        server.shutdown()
        server.server_close()
        server.close_connections()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("FakeHub is not started")
        return self._server.server_address[1]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- what tests look at --------------------------------------------------------------------

    @property
    def repo_ids(self) -> tuple[str, ...]:
        return tuple(self._repos)

    def commit_sha(self, repo_id: str) -> str:
        """The repo's only commit (40 hex chars), which `main` resolves to."""
        return self._repos[repo_id].commit

    def files(self, repo_id: str) -> tuple[str, ...]:
        """Paths of the repo's files, sorted."""
        return tuple(sorted(self._repos[repo_id].files))

    def set_faults(self, faults: Faults | None, repo_id: str | None = None) -> None:
        """Replace the hub-wide faults (or one repo's) and restart their counts."""
        if repo_id is not None and repo_id not in self._repos:
            raise KeyError(repo_id)
        with self._lock:
            self._faults[repo_id] = faults or Faults()
            for key in [k for k in self._fault_counts if k[0] == repo_id]:
                del self._fault_counts[key]

    @property
    def requests(self) -> tuple[HubRequest, ...]:
        with self._lock:
            return tuple(self._requests)

    def count(
        self,
        kind: RequestKind | None = None,
        *,
        repo_id: str | None = None,
        path: str | None = None,
        status: int | None = None,
        fault: str | None = None,
    ) -> int:
        """How many requests matched. Kinds: "info", "tree" and "head" are metadata; "file" is
        a file-content GET; "unknown" is anything the fake does not implement."""
        return sum(
            1
            for r in self.requests
            if (kind is None or r.kind == kind)
            and (repo_id is None or r.repo_id == repo_id)
            and (path is None or r.path == path)
            and (status is None or r.status == status)
            and (fault is None or r.fault == fault)
        )

    def reset_counts(self) -> None:
        with self._lock:
            self._requests.clear()

    # -- request handling ----------------------------------------------------------------------

    def _handle(self, req: BaseHTTPRequestHandler, method: str) -> None:
        split = urlsplit(req.path)
        query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        kind, repo_id, revision, path = _route(method, [unquote(p) for p in split.path.split("/")])
        authorized = req.headers.get("Authorization") is not None

        def record(status: int, fault: str | None = None) -> None:
            with self._lock:
                self._requests.append(
                    HubRequest(
                        method,
                        kind,
                        repo_id,
                        path,
                        status,
                        req.headers.get("Range"),
                        authorized,
                        fault,
                    )
                )

        try:
            if kind == "unknown":
                raise _Reply(404, f"Not found: {method} {split.path}")
            assert repo_id is not None and revision is not None
            self._inject_unavailable(kind, repo_id)
            repo = self._repos.get(repo_id)
            if repo is None:
                raise _Reply(404, "Repository not found", "RepoNotFound")
            if kind in ("head", "file"):
                self._check_gate(req, repo_id)
            if revision not in ("main", repo.commit):
                raise _Reply(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            if kind == "info":
                info = self._info(repo, with_blobs=_true(query.get("blobs")))
                record(200)
                _send_json(req, 200, info)
            elif kind == "tree":
                tree = self._tree(repo, path or "", recursive=_true(query.get("recursive")))
                record(200)
                _send_json(req, 200, tree)
            else:
                assert path is not None
                self._serve_file(req, repo, path, head=kind == "head", record=record)
        except _Reply as reply:
            record(reply.status, reply.fault)
            headers = dict(reply.headers)
            if reply.code:
                headers["X-Error-Code"] = reply.code
            headers["X-Error-Message"] = reply.message
            _send_json(req, reply.status, {"error": reply.message}, headers, head=method == "HEAD")
        except (BrokenPipeError, ConnectionResetError):
            req.close_connection = True

    def _scoped_faults(self, repo_id: str) -> list[tuple[str | None, Faults]]:
        scopes: list[tuple[str | None, Faults]] = [(None, self._faults[None])]
        if repo_id in self._faults:
            scopes.append((repo_id, self._faults[repo_id]))
        return scopes

    def _take(self, scope: str | None, fault: str, path: str | None, limit: int) -> bool:
        """Whether this request is among the first `limit` that `fault` hits (counts it)."""
        if limit <= 0:
            return False
        with self._lock:
            key = (scope, fault, path)
            self._fault_counts[key] += 1
            return self._fault_counts[key] <= limit

    def _inject_unavailable(self, kind: str, repo_id: str) -> None:
        for scope, faults in self._scoped_faults(repo_id):
            if kind in faults.unavailable_kinds and self._take(
                scope, "unavailable", None, faults.unavailable
            ):
                raise _Reply(503, "Service Unavailable", fault="unavailable")

    def _check_gate(self, req: BaseHTTPRequestHandler, repo_id: str) -> None:
        tokens = [f.gated_token for _, f in self._scoped_faults(repo_id) if f.gated_token]
        if not tokens:
            return
        sent = req.headers.get("Authorization", "")
        if not any(hmac.compare_digest(sent.encode(), f"Bearer {t}".encode()) for t in tokens):
            raise _Reply(
                401,
                f"Access to model {repo_id} is restricted. You must have access to it and be"
                " authenticated to access it. Please log in.",
                "GatedRepo",
            )

    def _gated(self, repo_id: str) -> bool:
        return any(f.gated_token for _, f in self._scoped_faults(repo_id))

    def _info(self, repo: _Repo, *, with_blobs: bool) -> dict:
        siblings = []
        for f in repo.files.values():
            sibling: dict = {"rfilename": f.path}
            if with_blobs:
                sibling.update(size=f.size, blobId=f.blob_id)
                if f.is_lfs:
                    sibling["lfs"] = {
                        "sha256": f.sha256,
                        "size": f.size,
                        "pointerSize": f.pointer_size,
                    }
            siblings.append(sibling)
        owner = repo.repo_id.split("/")[0]
        return {
            "_id": repo.commit[:24],
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "author": owner,
            "sha": repo.commit,
            "private": False,
            "disabled": False,
            "gated": "manual" if self._gated(repo.repo_id) else False,
            "tags": [],
            "downloads": 0,
            "likes": 0,
            "siblings": siblings,
        }

    def _tree(self, repo: _Repo, prefix: str, *, recursive: bool) -> list[dict]:
        prefix = prefix.strip("/")
        folders = repo.folders()
        if prefix and prefix not in folders:
            if prefix in repo.files:
                raise _Reply(400, f"{prefix} is a file, not a folder")
            raise _Reply(
                404, f"{prefix} does not exist on main", "EntryNotFound", _commit_header(repo)
            )
        base = f"{prefix}/" if prefix else ""

        def listed(path: str) -> bool:
            if not path.startswith(base) or path == prefix:
                return False
            return recursive or "/" not in path[len(base) :]

        entries: list[dict] = []
        for folder in folders:
            if listed(folder):
                oid = hashlib.sha1(
                    "".join(
                        f"{f.blob_id} {p}\n" for p, f in repo.files.items() if p.startswith(folder)
                    ).encode()
                ).hexdigest()
                entries.append({"type": "directory", "oid": oid, "size": 0, "path": folder})
        for f in repo.files.values():
            if listed(f.path):
                entry: dict = {"type": "file", "oid": f.blob_id, "size": f.size, "path": f.path}
                if f.is_lfs:
                    entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": f.pointer_size}
                entries.append(entry)
        return sorted(entries, key=lambda e: e["path"])

    def _serve_file(self, req, repo: _Repo, path: str, *, head: bool, record) -> None:
        f = repo.files.get(path)
        if f is None:
            raise _Reply(404, f"{path} does not exist", "EntryNotFound", _commit_header(repo))
        start, end = _parse_range(req.headers.get("Range"), f.size)
        partial = req.headers.get("Range") is not None
        headers = {
            **_commit_header(repo),
            "ETag": f'"{f.etag}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
            "Content-Disposition": f'inline; filename="{path.rsplit("/", 1)[-1]}"',
        }
        if f.is_lfs:
            # The Hub names the LFS object in these; the client prefers them over ETag.
            headers["X-Linked-Etag"] = f'"{f.sha256}"'
            headers["X-Linked-Size"] = str(f.size)
        if partial:
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{f.size}"
        status = 206 if partial else 200

        if head:
            record(status)
            _send_head(req, status, headers, end - start)
            return

        fault: str | None = None
        hang_s = 0.0
        for scope, faults in self._scoped_faults(repo.repo_id):
            for name, counts in (
                ("hang", faults.hang),
                ("cut", faults.cut),
                ("corrupt", faults.corrupt),
            ):
                if fault is None and self._take(scope, name, path, counts.get(path, 0)):
                    fault, hang_s = name, faults.hang_s
        if fault == "hang":
            record(0, fault)
            self._stop.wait(hang_s)
            req.close_connection = True
            return
        cut, corrupt = fault == "cut", fault == "corrupt"

        record(status, fault)
        _send_head(req, status, headers, end - start)
        stop_at = min(end, f.size // 2) if cut else end
        with f.source.open("rb") as src:
            src.seek(start)
            offset = start
            while offset < stop_at:
                chunk = src.read(min(_CHUNK, stop_at - offset))
                if not chunk:
                    break
                if corrupt and offset == 0:
                    chunk = bytes([chunk[0] ^ 0xFF]) + chunk[1:]
                req.wfile.write(chunk)
                offset += len(chunk)
        req.wfile.flush()
        if cut:
            req.close_connection = True


def _route(method: str, parts: list[str]) -> tuple[RequestKind, str | None, str | None, str | None]:
    """(kind, repo id, revision, path in repo) of a request path split on "/" (parts[0] == "")."""
    parts = parts[1:]
    if method == "GET" and parts[:2] == ["api", "models"] and len(parts) >= 4:
        repo_id, rest = f"{parts[2]}/{parts[3]}", parts[4:]
        if not rest:
            return "info", repo_id, "main", None
        if rest[0] == "revision" and len(rest) == 2:
            return "info", repo_id, rest[1], None
        if rest[0] == "tree" and len(rest) >= 2:
            return "tree", repo_id, rest[1], "/".join(rest[2:])
    if method in ("GET", "HEAD") and len(parts) >= 5 and parts[2] == "resolve" and parts[-1]:
        kind: RequestKind = "head" if method == "HEAD" else "file"
        return kind, f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:])
    return "unknown", None, None, None


def _parse_range(header: str | None, size: int) -> tuple[int, int]:
    """[start, end) of a `Range: bytes=...` header (the whole file when absent)."""
    if header is None:
        return 0, size
    try:
        unit, _, spec = header.partition("=")
        first, _, last = spec.split(",")[0].strip().partition("-")
        if unit.strip() != "bytes":
            raise ValueError(unit)
        if first == "":  # suffix range: the last N bytes
            start, end = max(size - int(last), 0), size
        else:
            start, end = int(first), (min(int(last) + 1, size) if last else size)
    except ValueError:
        start, end = size, size
    if start >= end or start >= size:
        raise _Reply(416, "Range Not Satisfiable", headers={"Content-Range": f"bytes */{size}"})
    return start, end


def _commit_header(repo: _Repo) -> dict[str, str]:
    return {"X-Repo-Commit": repo.commit}


def _true(value: str | None) -> bool:
    return value is not None and value.lower() in ("1", "true", "yes")


def _send_head(req: BaseHTTPRequestHandler, status: int, headers: dict, length: int) -> None:
    req.send_response(status)
    for name, value in headers.items():
        req.send_header(name, value)
    req.send_header("Content-Length", str(length))
    req.end_headers()


def _send_json(
    req: BaseHTTPRequestHandler,
    status: int,
    body: object,
    headers: dict | None = None,
    *,
    head: bool = False,
) -> None:
    data = json.dumps(body).encode()
    _send_head(req, status, {"Content-Type": "application/json", **(headers or {})}, len(data))
    if not head:
        req.wfile.write(data)


@contextmanager
def serve_embedded(
    cache_root: Path,
    *,
    faults: Faults | None = None,
    progress: Callable[[str], None] | None = None,
) -> Iterator[FakeHub]:
    """Serve the embedded tiny Phi-3 and its ONNX release (built on first use) as their hub repos.

    Args:
        cache_root: where `ensure_embedded_repos` builds and keeps the repos' folders.
        faults: hub-wide faults to inject (none by default).
        progress: hears about the first-run build of the repos.
    """
    # Imported here: building the repos needs torch, which serving a folder does not.
    from offline_kit.embedded import ensure_embedded_repos

    with FakeHub(ensure_embedded_repos(Path(cache_root), progress), faults=faults) as hub:
        yield hub
