"""The peak memory of this process alone, for the fresh processes that measure a model's cost.

`resource.getrusage(RUSAGE_SELF).ru_maxrss` is not it: Linux carries the parent's high-water
mark across fork and exec, so a fresh process started by a flow that once held 9.9 GB reports
9.9 GB whatever it loads (measured). `VmHWM` in /proc/self/status belongs to the process's own
address space, which exec replaces.
"""

from __future__ import annotations

from pathlib import Path


def own_peak_rss_mb() -> float:
    """This process's peak resident set size since it started (or exec'd), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e6
    raise RuntimeError("/proc/self/status has no VmHWM line: not Linux?")
