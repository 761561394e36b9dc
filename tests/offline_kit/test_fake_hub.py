"""The loopback fake hub: the HTTP API huggingface_hub uses, request counts, injected faults."""

from __future__ import annotations

import hashlib
import random
import time
from pathlib import Path

import httpx
import pytest
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFile, RepoFolder

from offline_kit.fake_hub import ALWAYS, FakeHub, Faults, git_blob_sha1, serve_embedded

REPO = "acme/tiny"
WEIGHTS = "weights/model.safetensors"
CONFIG = "config.json"
TOKEN = "hf_fake_gate_token_0123456789"


@pytest.fixture()
def repo_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "repo"
    (folder / "weights").mkdir(parents=True)
    (folder / CONFIG).write_text('{"hidden_size": 8}\n')
    (folder / "README.md").write_text("# tiny\n")
    (folder / WEIGHTS).write_bytes(random.Random(0).randbytes(200_000))
    (folder / ".gitattributes_local").write_text("not served: hidden\n")
    return folder


@pytest.fixture()
def hub(repo_dir: Path):
    with FakeHub({REPO: repo_dir}) as hub:
        yield hub


def _api(hub: FakeHub) -> HfApi:
    return HfApi(endpoint=hub.endpoint, token=False)


@pytest.mark.unit
def test_binds_loopback_with_an_os_chosen_port(hub: FakeHub) -> None:
    assert hub.endpoint == f"http://127.0.0.1:{hub.port}"
    assert hub.port > 0


@pytest.mark.unit
def test_commit_derives_from_contents_and_main_resolves_to_it(hub: FakeHub, repo_dir: Path) -> None:
    commit = hub.commit_sha(REPO)
    assert len(commit) == 40 and int(commit, 16) >= 0
    assert FakeHub({REPO: repo_dir}).commit_sha(REPO) == commit  # deterministic
    assert _api(hub).model_info(REPO, revision="main").sha == commit
    assert _api(hub).model_info(REPO).sha == commit
    assert _api(hub).model_info(REPO, revision=commit).sha == commit

    (repo_dir / CONFIG).write_text('{"hidden_size": 16}\n')
    assert FakeHub({REPO: repo_dir}).commit_sha(REPO) != commit


@pytest.mark.unit
def test_model_info_files_metadata_gives_hub_checksums(hub: FakeHub, repo_dir: Path) -> None:
    info = _api(hub).model_info(REPO, files_metadata=True)
    siblings = {s.rfilename: s for s in info.siblings}
    assert set(siblings) == {CONFIG, "README.md", WEIGHTS}  # hidden files are not served

    config = siblings[CONFIG]
    assert config.lfs is None
    assert config.blob_id == git_blob_sha1((repo_dir / CONFIG).read_bytes())

    weights = siblings[WEIGHTS]
    data = (repo_dir / WEIGHTS).read_bytes()
    assert weights.lfs.sha256 == hashlib.sha256(data).hexdigest()
    assert weights.lfs.size == weights.size == len(data)
    assert weights.lfs.pointer_size > 0
    assert weights.blob_id != git_blob_sha1(data)  # git stores the LFS pointer, not the data

    plain = _api(hub).model_info(REPO)
    assert all(s.blob_id is None for s in plain.siblings)  # only with files_metadata=True


@pytest.mark.unit
def test_resolve_headers_match_the_real_hub(hub: FakeHub, repo_dir: Path) -> None:
    commit = hub.commit_sha(REPO)
    data = (repo_dir / WEIGHTS).read_bytes()
    lfs = httpx.head(f"{hub.endpoint}/{REPO}/resolve/main/{WEIGHTS}")
    assert lfs.status_code == 200
    assert lfs.headers["X-Repo-Commit"] == commit
    assert lfs.headers["ETag"] == f'"{hashlib.sha256(data).hexdigest()}"'
    assert lfs.headers["X-Linked-Etag"] == lfs.headers["ETag"]
    assert lfs.headers["X-Linked-Size"] == lfs.headers["Content-Length"] == str(len(data))
    assert "X-Xet-Hash" not in lfs.headers  # the client must not take its Xet path

    plain = httpx.head(f"{hub.endpoint}/{REPO}/resolve/{commit}/{CONFIG}")
    assert plain.headers["ETag"] == f'"{git_blob_sha1((repo_dir / CONFIG).read_bytes())}"'
    assert "X-Linked-Etag" not in plain.headers


@pytest.mark.unit
@pytest.mark.parametrize(
    ("range_header", "start", "end"),
    [("bytes=10-19", 10, 20), ("bytes=199990-", 199_990, 200_000), ("bytes=-5", 199_995, 200_000)],
)
def test_range_requests(hub: FakeHub, repo_dir: Path, range_header: str, start: int, end: int):
    data = (repo_dir / WEIGHTS).read_bytes()
    url = f"{hub.endpoint}/{REPO}/resolve/main/{WEIGHTS}"
    response = httpx.get(url, headers={"Range": range_header})
    assert response.status_code == 206
    assert response.content == data[start:end]
    assert response.headers["Content-Range"] == f"bytes {start}-{end - 1}/{len(data)}"
    assert httpx.get(url, headers={"Range": "bytes=300000-"}).status_code == 416


@pytest.mark.unit
def test_tree_listing(hub: FakeHub) -> None:
    commit = hub.commit_sha(REPO)
    everything = list(_api(hub).list_repo_tree(REPO, recursive=True, revision=commit))
    files = {e.path: e for e in everything if isinstance(e, RepoFile)}
    assert set(files) == {CONFIG, "README.md", WEIGHTS}
    assert files[WEIGHTS].lfs is not None and files[CONFIG].lfs is None
    assert [e.path for e in everything if isinstance(e, RepoFolder)] == ["weights"]

    top = {e.path for e in _api(hub).list_repo_tree(REPO)}
    assert top == {CONFIG, "README.md", "weights"}
    assert {e.path for e in _api(hub).list_repo_tree(REPO, "weights")} == {WEIGHTS}


@pytest.mark.unit
def test_snapshot_download_counts_requests_and_second_call_is_offline(
    hub: FakeHub, repo_dir: Path, tmp_path: Path
) -> None:
    commit = hub.commit_sha(REPO)
    kwargs = dict(revision=commit, cache_dir=tmp_path / "hf", endpoint=hub.endpoint, token=False)
    folder = Path(snapshot_download(REPO, allow_patterns=["*.json", "weights/*"], **kwargs))
    assert (folder / WEIGHTS).read_bytes() == (repo_dir / WEIGHTS).read_bytes()
    assert not (folder / "README.md").exists()
    assert hub.count("tree") == 1
    assert hub.count("head") == 2
    assert hub.count("file") == 2
    assert hub.count("file", path=WEIGHTS) == 1
    assert hub.count("unknown") == 0  # nothing the fake does not implement was called

    hub.reset_counts()
    snapshot_download(REPO, allow_patterns=["*.json", "weights/*"], **kwargs)
    assert hub.count() == 0  # commit pinned + cached tree + cached files: no request at all


@pytest.mark.unit
def test_unavailable_for_the_first_requests(hub: FakeHub) -> None:
    hub.set_faults(Faults(unavailable=2, unavailable_kinds=frozenset({"info"})))
    url = f"{hub.endpoint}/api/models/{REPO}/revision/main"
    assert [httpx.get(url).status_code for _ in range(3)] == [503, 503, 200]
    assert httpx.head(f"{hub.endpoint}/{REPO}/resolve/main/{CONFIG}").status_code == 200


@pytest.mark.unit
def test_faults_can_target_one_repo(repo_dir: Path) -> None:
    other = "acme/other"
    with FakeHub(
        {REPO: repo_dir, other: repo_dir}, repo_faults={other: Faults(unavailable=ALWAYS)}
    ) as hub:
        assert httpx.get(f"{hub.endpoint}/api/models/{REPO}").status_code == 200
        assert httpx.get(f"{hub.endpoint}/api/models/{other}").status_code == 503


@pytest.mark.unit
def test_gated_repo_needs_the_token_for_files_only(hub: FakeHub, tmp_path: Path) -> None:
    hub.set_faults(Faults(gated_token=TOKEN), repo_id=REPO)
    info = _api(hub).model_info(REPO)  # metadata stays public, as on the Hub
    assert info.gated == "manual"

    refused = httpx.head(f"{hub.endpoint}/{REPO}/resolve/main/{CONFIG}")
    assert refused.status_code == 401
    assert refused.headers["X-Error-Code"] == "GatedRepo"
    kwargs = dict(cache_dir=tmp_path / "hf", endpoint=hub.endpoint)
    with pytest.raises(GatedRepoError):
        hf_hub_download(REPO, CONFIG, token=False, **kwargs)
    with pytest.raises(GatedRepoError):
        hf_hub_download(REPO, CONFIG, token="hf_wrong", **kwargs)
    assert Path(hf_hub_download(REPO, CONFIG, token=TOKEN, **kwargs)).is_file()
    assert hub.requests[-1].authorized


@pytest.mark.unit
def test_unknown_repo_revision_and_file(hub: FakeHub, tmp_path: Path) -> None:
    response = httpx.get(f"{hub.endpoint}/api/models/acme/nope/revision/main")
    assert response.status_code == 404
    assert response.headers["X-Error-Code"] == "RepoNotFound"
    with pytest.raises(RepositoryNotFoundError):
        _api(hub).model_info("acme/nope")
    with pytest.raises(RevisionNotFoundError):
        _api(hub).model_info(REPO, revision="v9")
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download(
            REPO, "nope.json", cache_dir=tmp_path / "hf", endpoint=hub.endpoint, token=False
        )


@pytest.mark.unit
def test_connection_cut_mid_file(hub: FakeHub, repo_dir: Path) -> None:
    data = (repo_dir / WEIGHTS).read_bytes()
    hub.set_faults(Faults(cut={WEIGHTS: 1}))
    url = f"{hub.endpoint}/{REPO}/resolve/main/{WEIGHTS}"
    received = bytearray()
    with pytest.raises(httpx.RemoteProtocolError), httpx.stream("GET", url) as response:
        assert response.headers["Content-Length"] == str(len(data))  # announces the whole file
        for chunk in response.iter_raw():
            received += chunk
    assert 0 < len(received) < len(data)
    assert bytes(received) == data[: len(received)]
    assert httpx.get(url).content == data  # only the first GET was cut


@pytest.mark.unit
def test_hang_past_the_client_timeout_is_bounded(hub: FakeHub, repo_dir: Path) -> None:
    hub.set_faults(Faults(hang={CONFIG: 1}, hang_s=30))
    url = f"{hub.endpoint}/{REPO}/resolve/main/{CONFIG}"
    with pytest.raises(httpx.ReadTimeout):
        httpx.get(url, timeout=0.3)
    assert httpx.get(url).content == (repo_dir / CONFIG).read_bytes()
    assert [r.status for r in hub.requests] == [0, 200]

    hub.set_faults(Faults(hang={CONFIG: 1}, hang_s=30))
    with pytest.raises(httpx.ReadTimeout):
        httpx.get(url, timeout=0.3)
    started = time.monotonic()
    hub.close()  # ends the hung request instead of waiting 30 s
    assert time.monotonic() - started < 5


@pytest.mark.unit
def test_corrupted_file_keeps_true_metadata(hub: FakeHub, repo_dir: Path) -> None:
    data = (repo_dir / WEIGHTS).read_bytes()
    hub.set_faults(Faults(corrupt={WEIGHTS: 1}))
    url = f"{hub.endpoint}/{REPO}/resolve/main/{WEIGHTS}"
    corrupted = httpx.get(url)
    assert len(corrupted.content) == len(data) and corrupted.content != data
    assert corrupted.headers["ETag"] == f'"{hashlib.sha256(data).hexdigest()}"'
    assert httpx.get(url).content == data


@pytest.mark.integration
def test_serve_embedded_serves_both_phi3_repos(embedded_repos: dict[str, Path]) -> None:
    from slmops.config import PHI3_ONNX_INT4_SUBFOLDER, TINY_PHI3_ONNX_REPO_ID, TINY_PHI3_REPO_ID

    cache_root = embedded_repos[TINY_PHI3_REPO_ID].parent  # already built: serve_embedded reuses it
    with serve_embedded(cache_root) as hub:
        assert set(hub.repo_ids) == {TINY_PHI3_REPO_ID, TINY_PHI3_ONNX_REPO_ID}
        files = hub.files(TINY_PHI3_ONNX_REPO_ID)
        assert f"{PHI3_ONNX_INT4_SUBFOLDER}/genai_config.json" in files
        assert "config.json" in hub.files(TINY_PHI3_REPO_ID)
        info = HfApi(endpoint=hub.endpoint).model_info(TINY_PHI3_REPO_ID, token=False)
        assert info.sha == hub.commit_sha(TINY_PHI3_REPO_ID)
