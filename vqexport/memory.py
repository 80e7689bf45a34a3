"""How much memory a new allocation can take on this machine (checks before V-wide work, caches that must fit)."""

from __future__ import annotations

from pathlib import Path


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation: Linux's MemAvailable, or what the process's cgroup (v2) limit
    leaves, whichever is less; None where neither is known."""
    found = []
    try:
        with open("/proc/meminfo") as f:
            found += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            found.append(int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return min(found) if found else None
