"""Positioned file I/O and the one way a file is put in place.

Reads and writes go through `os.readv` / `os.pwrite` at explicit offsets (no memory map, so nothing stays
resident once a buffer is freed). Every file that must appear whole or not at all (shards, the index, the
journal, the report, config.json, a sweep's results) is written under a temporary name and renamed into place by
`atomic_write`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


def read_fully(fd: int, buf: memoryview, offset: int) -> int:
    """Fill `buf` from byte `offset` of the open file `fd`, looping on short reads (one read returns at most
    about 2 GiB on Linux); returns the bytes read, fewer than asked only at the end of the file."""
    os.lseek(fd, offset, os.SEEK_SET)
    done = 0
    while done < len(buf):
        got = os.readv(fd, [buf[done:]])
        if got == 0:
            break
        done += got
    return done


def write_fully(fd: int, view: memoryview, offset: int) -> None:
    """Write all of `view` at byte `offset` of the open file `fd`, looping on short writes."""
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's contents to the disk (a folder's: the names it holds)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` for the caller to write; then flush it, rename it over `path` and flush
    the folder, so that `path` holds either its previous contents or the new ones, never a part. On an error the
    temporary file is removed and `path` is left as it was."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)
