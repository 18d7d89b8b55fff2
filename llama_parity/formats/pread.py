"""Positioned reads straight into a caller's buffer, and page-cache advice.

Why not a memory map: pages of a mapped file count in the process's RSS for as long as the mapping
lives, so streaming a 16 GB file through one looks like 16 GB of memory to `top`, schedulers and
cgroup limits. A pread copies into a buffer the caller owns and reuses.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import FormatError

_fadvise = getattr(os, "posix_fadvise", None)


def open_for_reading(path: str | Path, *, sequential: bool = False) -> int:
    """A read-only file descriptor; `sequential`: the file is read front to back in large pieces, so
    let the kernel's readahead be generous."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    if sequential and _fadvise is not None:
        try:
            _fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        except OSError:
            pass
    return fd


def pread_into(fd: int, buf: memoryview, offset: int, *, name: str | Path) -> None:
    """Fill `buf` (a writable byte view) from file offset `offset`; a short file is a FormatError
    naming `name` (the file, or the file and tensor)."""
    done = 0
    while done < len(buf):
        if hasattr(os, "preadv"):
            n = os.preadv(fd, [buf[done:]], offset + done)
        else:  # pragma: no cover - platforms without preadv (Windows): pread returns new bytes
            chunk = os.pread(fd, len(buf) - done, offset + done)
            n = len(chunk)
            buf[done:done + n] = chunk
        if n <= 0:
            raise FormatError(f"{name}: unexpected end of file at byte {offset + done} (truncated download?)")
        done += n


def drop_cache(fd: int, offset: int, length: int) -> None:
    """Tell the kernel these file pages will not be needed again (no-op where unsupported).

    Not about our RSS (page cache is not RSS): a 16 GB conversion should not push 16 GB of other
    programs' cached files out of memory. On dirty pages it also starts their writeback early.
    """
    if _fadvise is not None and length > 0:
        try:
            _fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass
