"""Snapshot verification speed: checking downloaded files against the hub's checksums.

`tasks.hub.verify_snapshot` hashes every fetched file (sha256 for LFS files, the git blob sha1
for the others). On the Phi-3-mini twin (two 3.8 GB bf16 shards, `benchmarks.fullsize`) this
measures, in MB/s of files checked:

- `read`: reading the files only (a warm-up that puts them in the page cache, and the bound
  that hashing cannot beat);
- `before`: the previous code, one file after another in 1 MiB reads;
- `one thread`: `file_digest` with 8 MiB reads into one reused buffer, one file at a time;
- `verify_snapshot`: what a release runs (`file_digests`: files hashed in parallel threads).

It verifies hard links of the twin's files in a scratch folder beside them, so a mismatch
(which evicts the file) could only remove a link, never the shared twin.

    python -m benchmarks.snapshot_verify [--folder DIR] [--quick]

Without a twin (or with `--generate-gb N`) it writes N GB of random data in two files instead.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from huggingface_hub.hf_api import BlobLfsInfo, RepoSibling

from benchmarks.recording import Metric, PartResult, check, write_results
from tasks.hub import HASH_THREADS, file_digest, verify_snapshot

TWIN_CACHE = (
    Path(os.environ.get("SLMOPS_BENCH_CACHE", Path.home() / ".cache" / "slmops-bench")) / "twin"
)
TARGET_MBPS = 200.0


def twin_folder(layers: int) -> Path | None:
    """The full-size (32 layers) or CI-size twin's snapshot folder, if built."""
    found = sorted(
        p for p in TWIN_CACHE.glob(f"phi3-twin-*-l{layers}-*")
        if p.is_dir() and not p.name.endswith("-onnx") and any(p.glob("*.safetensors"))
    )  # fmt: skip
    return found[-1] if found else None


def generated_folder(root: Path, gigabytes: float) -> Path:
    """Two files of random bytes (`gigabytes` in all) and a config, like a two-shard snapshot."""
    folder = root / "generated"
    folder.mkdir()
    chunk = os.urandom(16 << 20)
    for index in (1, 2):
        with open(folder / f"model-0000{index}-of-00002.safetensors", "wb") as f:
            for _ in range(int(gigabytes * 1e9 / 2 / len(chunk))):
                f.write(chunk)
    (folder / "config.json").write_text('{"model_type": "phi3"}\n')
    return folder


def linked_copy(source: Path, scratch: Path) -> Path:
    """Hard links of `source`'s files in `scratch` (same file system: no bytes copied)."""
    folder = scratch / source.name
    folder.mkdir()
    for path in source.iterdir():
        if path.is_file() and not path.name.startswith("."):
            os.link(path, folder / path.name)
    return folder


def serial_1mib(path: Path, lfs: bool) -> str:
    """The previous verification of one file (tasks/hub.py before this benchmark)."""
    digest = hashlib.sha256() if lfs else hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def read_only(path: Path) -> int:
    buffer, total = bytearray(8 << 20), 0
    with path.open("rb", buffering=0) as f:
        while size := f.readinto(buffer):
            total += size
    return total


def timed(label: str, total: int, work: Callable[[], object]) -> dict[str, object]:
    start = time.perf_counter()
    work()
    seconds = time.perf_counter() - start
    print(f"{label}: {seconds:.2f} s, {total / 1e6 / seconds:.0f} MB/s", flush=True)
    return {"pass": label, "s": round(seconds, 2), "MB/s": round(total / 1e6 / seconds, 1)}


def run(folder: Path | None, quick: bool, generate_gb: float | None) -> PartResult:
    result = PartResult("snapshot_verify", "Snapshot verification speed", quick=quick)
    started = time.perf_counter()
    if folder is None and generate_gb is None:
        folder = twin_folder(1 if quick else 32)
    with tempfile.TemporaryDirectory(
        prefix="verify-", dir=TWIN_CACHE if folder is not None and TWIN_CACHE.is_dir() else None
    ) as tmp:
        scratch = Path(tmp)
        if folder is None:
            source = generated_folder(scratch, generate_gb or (0.5 if quick else 2.0))
            local = source
        else:
            source, local = folder, linked_copy(folder, scratch)
        files = sorted(p for p in local.iterdir() if p.is_file())
        total = sum(p.stat().st_size for p in files)
        lfs = {p.name: p.suffix == ".safetensors" for p in files}
        print(f"{source}: {len(files)} files, {total / 1e9:.2f} GB", flush=True)
        rows = [timed("read", total, lambda: [read_only(p) for p in files])]
        reference: dict[str, str] = {}
        rows.append(
            timed("before (serial, 1 MiB reads)", total,
                  lambda: reference.update({p.name: serial_1mib(p, lfs[p.name]) for p in files}))
        )  # fmt: skip
        rows.append(
            timed("one thread, 8 MiB reads", total,
                  lambda: [file_digest(p, "sha256" if lfs[p.name] else "git blob sha1")
                           for p in files])
        )  # fmt: skip
        siblings = [
            RepoSibling(
                rfilename=p.name,
                size=p.stat().st_size,
                lfs=BlobLfsInfo(size=p.stat().st_size, sha256=reference[p.name], pointer_size=0)
                if lfs[p.name]
                else None,
                blob_id=None if lfs[p.name] else reference[p.name],
            )  # fmt: skip
            for p in files
        ]
        rows.append(
            timed(f"verify_snapshot ({HASH_THREADS} threads)", total,
                  lambda: verify_snapshot(local, siblings))
        )  # fmt: skip
        intact = all(p.is_file() for p in files)  # a mismatch would have evicted one
    speed = {str(row["pass"]).split(" (")[0]: float(str(row["MB/s"])) for row in rows}
    verify = speed["verify_snapshot"]
    result.add(
        Metric("files verified", f"{len(files)} ({total / 1e9:.2f} GB)", note=str(source)),
        Metric("verify_snapshot", verify, "MB/s", f">= {TARGET_MBPS:.0f}",
               check(verify, ">=", TARGET_MBPS), note="every file matched" if intact else "MISMATCH"),
        Metric("before (serial, 1 MiB reads)", speed["before"], "MB/s"),
        Metric("speed-up over before", round(verify / speed["before"], 2), "x"),
        Metric("read only (page cache)", speed["read"], "MB/s", note="the bound for hashing"),
    )  # fmt: skip
    result.tables["passes"] = rows
    result.details = {"folder": str(source), "bytes": total, "threads": HASH_THREADS}
    result.wall_s = time.perf_counter() - started
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, help="a snapshot folder (default: the twin)")
    parser.add_argument("--quick", action="store_true", help="the 1-layer twin (620 MB)")
    parser.add_argument("--generate-gb", type=float, help="random files of this size instead")
    args = parser.parse_args()
    result = run(args.folder, args.quick, args.generate_gb)
    print(write_results(result).with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
