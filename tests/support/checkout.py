"""What a test session may not leave in the checkout: the state a release or MLflow writes
into the current directory when nothing points it elsewhere."""

from __future__ import annotations

from pathlib import Path

# MLflow's default artifact root and tracking store, the gateway's artifacts, SLMOPS_HOME's
# default.
STATE_NAMES = ("mlruns", "mlartifacts", "mlflow.db", ".slmops")


def state_in(checkout: Path) -> set[Path]:
    """State folders and files in `checkout` and its top-level folders (where tests and their
    subprocesses run), hidden folders such as .git or .venv aside."""
    folders = [
        checkout,
        *(p for p in checkout.iterdir() if p.is_dir() and not p.name.startswith(".")),
    ]
    return {folder / name for folder in folders for name in STATE_NAMES if (folder / name).exists()}
