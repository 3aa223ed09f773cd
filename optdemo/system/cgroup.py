"""The memory limit a cgroup puts on this process, when one does.

In a container, on a Space, or under a benchmark's cap, "available RAM" as the kernel reports it
for the whole machine (``psutil.virtual_memory().available``) can be far more than this process
may use: the cgroup's limit counts anonymous memory *and* page cache, so a disk tier that the
machine could cache still has to be re-read every token when the cap is tighter. The hardware
probe takes the smaller of the two (see :func:`optdemo.system.hardware.probe_hardware`).

Both cgroup versions are read: v1 (``memory.limit_in_bytes`` / ``memory.usage_in_bytes``) and v2
(``memory.max`` / ``memory.current``), walking up the hierarchy, since a parent's limit binds too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CGROUP_FS = Path("/sys/fs/cgroup")
# cgroup v1 writes "no limit" as the largest page-aligned 63-bit number.
_UNLIMITED = 2**62


@dataclass(frozen=True)
class MemoryLimit:
    """The tightest memory limit found, with the group's usage when it was read."""

    limit_bytes: int
    usage_bytes: int  # everything charged to the group, page cache included
    group: str  # the cgroup path that sets the limit
    cache_bytes: int = 0  # of which page cache, which the kernel reclaims when the group needs room

    @property
    def headroom_bytes(self) -> int:
        """What the group may still take: the limit less what it holds other than page cache."""
        return max(0, self.limit_bytes - (self.usage_bytes - self.cache_bytes))


def memory_limit(proc_cgroup: str = "/proc/self/cgroup", root: Path = CGROUP_FS) -> MemoryLimit | None:
    """The tightest cgroup memory limit over this process's group and its ancestors, or None when
    no cgroup limits memory (or cgroups are not visible here)."""
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None
    found: list[MemoryLimit] = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "memory" or "memory" in controllers.split(","):
            found += _walk(root / "memory", path, "memory.limit_in_bytes", "memory.usage_in_bytes", "cache")
        elif controllers == "":  # the v2 unified hierarchy
            for base in (root / "unified", root):
                found += _walk(base, path, "memory.max", "memory.current", "file")
    return min(found, key=lambda limit: limit.headroom_bytes, default=None)


def _walk(base: Path, path: str, limit_file: str, usage_file: str, cache_key: str) -> list[MemoryLimit]:
    """The limits set on ``path`` and each of its ancestors under ``base``."""
    limits = []
    parts = [p for p in path.split("/") if p]
    for depth in range(len(parts), -1, -1):
        group = base.joinpath(*parts[:depth])
        try:
            raw = (group / limit_file).read_text().strip()
            usage = int((group / usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if raw == "max" or int(raw) >= _UNLIMITED:
            continue
        limits.append(MemoryLimit(int(raw), usage, "/" + "/".join(parts[:depth]), _stat(group, cache_key)))
    return limits


def _stat(group: Path, key: str) -> int:
    """One counter of the group's ``memory.stat`` (0 when absent)."""
    try:
        for line in (group / "memory.stat").read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0
