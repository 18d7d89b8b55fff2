"""Facts about the machine this process runs on, shared by the test plugin and the launcher."""

from __future__ import annotations

import os
from pathlib import Path


def cpu_budget() -> int:
    """Cores this process may use (affinity and cgroup quota), so torch never runs more threads than that."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            n = min(n, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)
