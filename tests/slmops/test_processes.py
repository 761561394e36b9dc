from __future__ import annotations

import subprocess
import sys

import pytest

CHILD = "from slmops.processes import own_peak_rss_mb; print(own_peak_rss_mb())"


@pytest.mark.unit
def test_a_fresh_process_reports_its_own_peak_not_its_parents():
    ballast = bytearray(400 * 1024 * 1024)  # this process's high-water mark: over 400 MB
    ballast[::4096] = b"x" * len(ballast[::4096])  # touch every page
    child = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, check=True
    )
    del ballast
    # A bare Python takes ~10-40 MB; ru_maxrss would have said 400+ (the parent's mark).
    assert 1 < float(child.stdout) < 200
