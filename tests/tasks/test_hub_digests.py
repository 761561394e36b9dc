"""The checksums snapshot verification computes: hashed in threads, what git and sha256 say."""

from __future__ import annotations

import hashlib
import os
import subprocess

import pytest
from huggingface_hub.hf_api import BlobLfsInfo, RepoSibling

from tasks.hub import SnapshotVerificationError, file_digest, file_digests, verify_snapshot

pytestmark = pytest.mark.unit


@pytest.fixture()
def files(tmp_path):
    """Files around the 8 MiB read size, and an empty one, with their sha256."""
    sizes = {"empty": 0, "small": 5, "exact": 8 << 20, "over": (8 << 20) + 3, "big": 20 << 20}
    found = {}
    for name, size in sizes.items():
        data = os.urandom(size)
        (tmp_path / name).write_bytes(data)
        found[name] = hashlib.sha256(data).hexdigest()
    return tmp_path, found


def test_digests_match_sha256_and_git_in_order_whatever_the_threads(files):
    folder, sha256 = files
    names = list(sha256)
    git = subprocess.run(
        ["git", "hash-object", *names], cwd=folder, capture_output=True, text=True, check=True
    ).stdout.split()
    for threads in (1, 4):
        assert file_digests([(folder / n, "sha256") for n in names], threads) == list(
            sha256.values()
        )
        assert file_digests([(folder / n, "git blob sha1") for n in names], threads) == git
    assert file_digest(folder / "over", "sha256") == sha256["over"]


def test_verification_names_and_evicts_only_the_corrupt_file(files):
    folder, sha256 = files
    expected = [
        RepoSibling(rfilename=n, lfs=BlobLfsInfo(size=0, sha256=digest, pointer_size=0))
        for n, digest in sha256.items()
    ]
    verify_snapshot(folder, expected)
    with open(folder / "big", "r+b") as f:
        f.seek(12 << 20)
        f.write(b"x")
    with pytest.raises(SnapshotVerificationError, match=r"1 file\(s\).*big \(sha256 "):
        verify_snapshot(folder, expected)
    assert not (folder / "big").exists() and (folder / "over").is_file()
