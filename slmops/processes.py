"""Fresh Python processes: the ones that build, log, validate or evaluate a model so that its
memory goes back to the machine when they exit, and report what they held.

`checkout_env()` is the environment such a process needs to import this very checkout with
`python -m`, installed or not. `own_peak_rss_mb()` is its own peak memory:
`resource.getrusage(RUSAGE_SELF).ru_maxrss` is not, since Linux carries the parent's high-water
mark across fork and exec, so a fresh process started by a flow that once held 9.9 GB reports
9.9 GB whatever it loads (measured). `VmHWM` in /proc/self/status belongs to the process's own
address space, which exec replaces.
"""

from __future__ import annotations

import os
from pathlib import Path

# The folder holding slmops/, tasks/, flows/ and offline_kit/.
CHECKOUT_ROOT = Path(__file__).resolve().parent.parent


def checkout_env() -> dict[str, str]:
    """This process's environment, with the checkout first on PYTHONPATH."""
    path = os.pathsep.join(p for p in (str(CHECKOUT_ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path}


def own_peak_rss_mb() -> float:
    """This process's peak resident set size since it started (or exec'd), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e6
    raise RuntimeError("/proc/self/status has no VmHWM line: not Linux?")
