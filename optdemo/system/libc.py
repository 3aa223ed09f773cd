"""libc's memory-mapping calls, bound once with their C signatures (Linux only).

Through ctypes, not Python's ``mmap.madvise``: a ctypes call lets go of the GIL for as long as the
kernel reads, so warming the page cache from a thread never stalls the load or the forward pass
running beside it (``mmap.madvise`` holds the GIL while the kernel reads).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys

# Linux 5.14+: fault a mapped range in, reading it from disk, without touching it from Python.
MADV_POPULATE_READ = 22


def _bind() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    size, flag = ctypes.c_size_t, ctypes.c_int
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, size, flag, flag, flag, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, size]
    libc.madvise.argtypes = [ctypes.c_void_p, size, flag]
    return libc


_libc = _bind()
_MAP_FAILED = ctypes.c_void_p(-1).value


def available() -> bool:
    """Whether these calls exist here (Linux)."""
    return _libc is not None


def populate(address: int, length: int) -> None:
    """Fault a mapped range in, reading it from disk (``MADV_POPULATE_READ``); on kernels before
    5.14, which lack it, ask for read-ahead instead (``MADV_WILLNEED``). Nothing off Linux."""
    if _libc is None:
        return
    if _libc.madvise(address, length, MADV_POPULATE_READ):
        _libc.madvise(address, length, mmap.MADV_WILLNEED)


def will_need(ranges: list[tuple[int, int]]) -> None:
    """Ask the kernel to start reading these mapped ``(address, length)`` ranges (a hint only)."""
    if _libc is None:
        return
    for address, length in ranges:
        _libc.madvise(address, length, mmap.MADV_WILLNEED)


def populate_file_range(path: str, offset: int, length: int) -> None:
    """Read ``length`` bytes of ``path`` from ``offset`` (page-aligned) into the page cache through
    a mapping of their own, dropped once read, so nothing stays mapped (nor counted in RSS).

    Raises:
        OSError: the range cannot be mapped.
    """
    if _libc is None:
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        address = _libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, offset)
    finally:
        os.close(fd)
    if address in (None, _MAP_FAILED):
        raise OSError(ctypes.get_errno(), f"cannot map {path}")
    try:
        populate(address, length)
    finally:
        _libc.munmap(address, length)
