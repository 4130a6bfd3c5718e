"""Atomic file writes: readers see the previous file or the whole new one, never a partial file.

Every file fewstep writes (checkpoints, caches, schedules, tables, figures, samples) goes through `atomic_write`:
write to a fresh temporary file in the same folder (created exclusively under an unpredictable name, so a planted
file or symlink is never followed; permissions from the umask), fsync, `os.replace` onto the target, fsync the
folder. Temporary files left by a write that crashed (kill -9) are removed by the next write into the same folder:
a writer holds an exclusive `flock` on its temporary file, so only files no live writer holds are removed.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
import time
from collections.abc import Callable
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; stale temporary files are recognised by their age
    fcntl = None

TMP_SUFFIX = ".fewstep-tmp"
_STALE_SECONDS = 3600.0  # without flock: a temporary file untouched this long belongs to a crashed write
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not supported on every platform / file system
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def check_file_name(name: object, what: str) -> str:
    """`name` if it is a plain file name (no folder part, not '.' or '..', no NUL); else ValueError naming `what`."""
    if not isinstance(name, str):
        raise ValueError(f"{what} must be a plain file name (a string), got {type(name).__name__}")
    bad = not name or name in (".", "..") or "\x00" in name or "/" in name or "\\" in name
    if bad or (os.altsep and os.altsep in name) or Path(name).is_absolute() or Path(name).name != name:
        raise ValueError(f"{what} must be a plain file name without folder parts or '..', got {name!r}")
    return name


def _create_temporary(path: Path) -> tuple[int, Path]:
    """Create `.<name>.<random>.fewstep-tmp` next to `path` exclusively (O_EXCL, no symlink followed); (fd, path)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC
    for _ in range(100):
        tmp = path.with_name(f".{path.name[:120]}.{secrets.token_hex(8)}{TMP_SUFFIX}")
        try:
            fd = os.open(tmp, flags, 0o666)  # the umask (and default ACLs) give the final permissions
        except FileExistsError:
            continue
        if fcntl is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd, tmp
    raise FileExistsError(f"cannot create a temporary file next to {path}")


def _abandoned(path: Path) -> tuple[bool, int | None]:
    """Whether the temporary file `path` belongs to no running write; (answer, an fd holding its lock or None)."""
    try:
        info = os.lstat(path)
    except OSError:
        return False, None
    if not stat.S_ISREG(info.st_mode):
        return False, None
    if fcntl is None:
        return time.time() - info.st_mtime > _STALE_SECONDS, None
    try:
        fd = os.open(path, os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC)
    except OSError:
        return False, None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # a live writer holds it
        os.close(fd)
        return False, None
    if os.fstat(fd).st_ino != info.st_ino:
        os.close(fd)
        return False, None
    return True, fd


def clean_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete the temporary files of fewstep writes in `directory` that no running write holds; returns them."""
    removed = []
    for tmp in Path(directory).glob(f".*{TMP_SUFFIX}"):
        abandoned, fd = _abandoned(tmp)
        try:
            if abandoned:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
                    removed.append(tmp)
        finally:
            if fd is not None:
                os.close(fd)
    return removed


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_path)`, fsync the file, then `os.replace` it onto `path` (all or nothing); returns path.

    `write` must write the file named tmp_path (it exists, empty); abandoned temporary files in the folder are
    removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_temporaries(path.parent)
    fd: int | None
    fd, tmp = _create_temporary(path)
    try:
        write(tmp)
        _settle(tmp, fd)
        if fcntl is None:  # Windows cannot replace an open file; there is no lock to hold
            os.close(fd)
            fd = None
        os.replace(tmp, path)
    finally:
        if fd is not None:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    _fsync_dir(path.parent)
    return path


def _settle(tmp: Path, fd: int) -> None:
    """fsync the file now at `tmp` and give it the permissions of the temporary file we created (from the umask).

    A writer may replace the file instead of writing into it (safetensors' `save_file` writes a new file with mode
    0600): then the new inode is the one to flush, and it gets the umask's permissions like every other file.
    """
    mode = stat.S_IMODE(os.fstat(fd).st_mode)
    written = os.open(tmp, os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC)
    try:
        if stat.S_IMODE(os.fstat(written).st_mode) != mode:
            os.chmod(tmp, mode)
        os.fsync(written)
    finally:
        os.close(written)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Write a matplotlib figure atomically (format from the suffix, PNG by default) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".") or "png"))
    plt.close(fig)
    return path
