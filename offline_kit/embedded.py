"""The embedded default: the tiny Phi-3 and its ONNX release, laid out as the hub repos are.

`ensure_embedded_repos` builds both once per builder version into a cache folder; the loopback
fake hub (`offline_kit.fake_hub`) serves them as slmops/tiny-phi3 and slmops/tiny-phi3-onnx: repos of
their own, never mistaken for the real microsoft/Phi-3-mini-4k-instruct.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from offline_kit.tiny_model import BUILDER_VERSION, ensure_tiny_phi3
from slmops.config import (
    PHI3_ONNX_INT4_SUBFOLDER,
    TINY_PHI3_ONNX_REPO_ID,
    TINY_PHI3_REPO_ID,
    OnnxExportSpec,
)
from slmops.onnx_builder import build_onnx_model


def ensure_embedded_repos(
    cache_root: Path, progress: Callable[[str], None] | None = None
) -> dict[str, Path]:
    """Map repo id -> local folder holding that repo's files, building what is missing.

    Args:
        cache_root: where the built repos are kept (one build per builder version).
        progress: called with a line of text at each step of a build (none when cached).
    """
    model_dir = ensure_tiny_phi3(cache_root, progress)
    onnx_repo = cache_root / f"tiny-phi3-onnx-v{BUILDER_VERSION}"
    if not (onnx_repo / PHI3_ONNX_INT4_SUBFOLDER / "genai_config.json").exists():
        if progress is not None:
            progress("Exporting the embedded tiny Phi-3 to int4 ONNX (first run only)")
        staging = Path(tempfile.mkdtemp(prefix=".tiny-phi3-onnx-", dir=cache_root))
        try:
            build_onnx_model(model_dir, staging / PHI3_ONNX_INT4_SUBFOLDER, OnnxExportSpec())
            (staging / "README.md").write_text(
                "# Tiny Phi-3 ONNX (slmops embedded default)\n\n"
                f"int4 CPU build under `{PHI3_ONNX_INT4_SUBFOLDER}/`.\n"
            )
            with contextlib.suppress(OSError):  # built concurrently by another process
                staging.rename(onnx_repo)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return {TINY_PHI3_REPO_ID: model_dir, TINY_PHI3_ONNX_REPO_ID: onnx_repo}
