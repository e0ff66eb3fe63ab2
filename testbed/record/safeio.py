"""Writing record files without ever following a symbolic link, and replacing them atomically.

Found by attack (issue 23): ``ln -s victim D/run.lock`` truncated ``victim`` to a pid, a dangling
``D/metrics.jsonl`` link made the rows land outside ``D``. Here every record file is opened with
``O_NOFOLLOW`` (a planted link fails the open and is reported, never written through), a file that
must be new is created with ``O_EXCL``, and a non-regular file (a FIFO, a device) is refused
rather than written to. The directory a caller names is used as named (``--out`` may be a link
the user made); directories the record creates inside it are checked by ``record.rundir``.
"""
from __future__ import annotations

import errno
import os
import secrets
import stat
from pathlib import Path

O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)


class RunDirError(Exception):
    """A run directory (or a record file in it) cannot take this run: not creatable or writable, in
    use by another run, holding an earlier run, or a planted link. One line for the person who chose
    it (a usage error, exit 2)."""

    def __init__(self, path: Path | str, why: str):
        self.path, self.why = Path(path), why
        super().__init__(f"{path}: {why}")


def link_refusal(path: Path | str) -> RunDirError:
    return RunDirError(path, "is a symbolic link; testbed never writes a record through one (remove it)")


def is_link(path: Path | str) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(path).st_mode)
    except OSError:
        return False


def open_record(path: Path | str, flags: int, mode: int = 0o666) -> int:
    """``os.open`` that never follows a link at ``path`` and only returns a regular file.

    A link → RunDirError (one line). A FIFO or device → RunDirError too (``O_NONBLOCK`` on the
    open, so a FIFO without a reader does not block). Other errors are the OSError of the open.
    """
    try:
        fd = os.open(path, flags | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK, mode)
    except OSError as e:
        if e.errno == errno.ELOOP or (e.errno in (errno.EEXIST, errno.ENXIO) and is_link(path)):
            raise link_refusal(path) from None
        if e.errno == errno.ENXIO:  # a FIFO without a reader, opened for writing
            raise RunDirError(path, "is not a regular file; testbed writes its records only to regular files") from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise RunDirError(path, "is not a regular file; testbed writes its records only to regular files")
    os.set_blocking(fd, True)
    return fd


def _open_dir(path: Path) -> int:
    return os.open(path, os.O_RDONLY | O_DIRECTORY | O_CLOEXEC)


def write_bytes_atomic(path: Path | str, data: bytes) -> None:
    """Write a new file next to ``path`` (``O_EXCL | O_NOFOLLOW``), fsync, then rename it over ``path``.

    A reader sees the old or the new file, never a torn or empty one (a full disk fails the write of
    the temporary file, which is removed: the old file stays). A link at ``path`` is refused, not
    replaced. Mode: 0666 minus the umask, like ``open()``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if is_link(path):
        raise link_refusal(path)
    dir_fd = _open_dir(path.parent)
    tmp = f"{path.name}.{secrets.token_hex(6)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o666, dir_fd=dir_fd)
        try:
            _write_all(fd, data, path.name)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=dir_fd)
        except OSError:
            pass
        raise
    finally:
        os.close(dir_fd)


def _write_all(fd: int, data: bytes, name: str) -> None:
    """Every byte of ``data`` to ``fd`` (``name``: the file it will become; for fault injection)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def unlink_record_file(path: Path | str) -> bool:
    """Remove a record file this run replaces: a regular file or a link (the link itself, never
    its target). Returns whether something was removed."""
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False
    except IsADirectoryError:
        return False
