"""A memory cap for one benchmark run: its own cgroup, verified, measured and removed.

A capped run stands in for a machine whose RAM cannot cache the disk tier: the cgroup's limit
counts page cache as well as the process's own memory, so every token reads the disk tier back.
For a published number the cap must be real, so :class:`MemoryCap`

* creates a cgroup of its own (never shares one with another run),
* writes the limit and reads it back (the kernel rounds to pages; anything else is refused),
* moves the run's process into it before the process starts Python,
* records the peak usage and how often the limit was hit (``failcnt``),
* and removes the group afterwards.

It refuses (:class:`CapError`) when any of that is impossible: no cgroup v1 memory controller,
not writable (not root), or a limit that does not read back.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

V1_MEMORY = Path("/sys/fs/cgroup/memory")
_PAGE = os.sysconf("SC_PAGE_SIZE")
_counter = itertools.count()


class CapError(RuntimeError):
    """The memory cap cannot be set up as required."""


@dataclass(frozen=True)
class CapReport:
    """What the cap was and what the run did under it, read from the cgroup after the run."""

    limit_bytes: int  # read back from the kernel
    peak_bytes: int  # memory.max_usage_in_bytes: anonymous memory and page cache
    failcnt: int  # times the limit was hit (reclaim had to run)


class MemoryCap:
    """A fresh cgroup v1 memory group limited to ``limit_bytes`` (use as a context manager)."""

    def __init__(self, limit_bytes: int, root: Path = V1_MEMORY) -> None:
        if not (root / "memory.limit_in_bytes").exists():
            raise CapError(f"a RAM cap needs the cgroup v1 memory controller at {root}; it is not there")
        if not os.access(root, os.W_OK):
            raise CapError(f"a RAM cap needs to create a cgroup under {root}: run as root")
        self.group = root / f"optdemo-bench-{os.getpid()}-{next(_counter)}"
        self.group.mkdir()
        try:
            (self.group / "memory.limit_in_bytes").write_text(str(limit_bytes))
            self.limit_bytes = int((self.group / "memory.limit_in_bytes").read_text())
            if not limit_bytes - _PAGE < self.limit_bytes <= limit_bytes:
                raise CapError(f"asked for a {limit_bytes} B cap, the kernel set {self.limit_bytes} B")
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> MemoryCap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def join(self) -> Callable[[], None]:
        """A ``preexec_fn`` that moves the child into the group before it runs anything."""
        procs = self.group / "cgroup.procs"

        def join_group() -> None:
            procs.write_text(str(os.getpid()))

        return join_group

    def report(self) -> CapReport:
        """The limit, the peak usage and the number of times the limit was hit, so far."""
        return CapReport(
            self.limit_bytes,
            int((self.group / "memory.max_usage_in_bytes").read_text()),
            int((self.group / "memory.failcnt").read_text()),
        )

    def close(self) -> None:
        """Remove the group (its processes have exited; their page cache is moved to the parent)."""
        with contextlib.suppress(FileNotFoundError):
            with contextlib.suppress(OSError):
                (self.group / "memory.force_empty").write_text("0")
            self.group.rmdir()


def drop_caches() -> bool:
    """Drop the whole page cache (``/proc/sys/vm/drop_caches``); False when not allowed."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3")
    except OSError:
        return False
    return True
