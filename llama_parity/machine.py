"""Facts about the machine this process runs on (cores, memory), shared by the test plugin, the
launcher, verify's memory checks and the benchmarks."""

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


def available_memory() -> int | None:
    """Bytes this process can still use without swapping: MemAvailable, capped by a cgroup limit."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
        limit, used = (Path("/sys/fs/cgroup") / n for n in ("memory.max", "memory.current"))
        if limit.is_file() and limit.read_text().strip() != "max":
            room = int(limit.read_text()) - int(used.read_text())
            avail = room if avail is None else min(avail, room)
    except (OSError, ValueError):
        pass
    return avail
