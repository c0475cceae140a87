"""The per-user runtime directory of shared mode, and secure file creation.

Location, first that works: ``$CDP_RUNTIME_DIR``; ``/dev/shm/cdpmp-<uid>`` (tmpfs, so
the ring is memory); ``$XDG_RUNTIME_DIR/cdpmp``; ``<tempdir>/cdpmp-<uid>``. The
directory must be 0700 and owned by us; every file in it is created 0600 with
``O_NOFOLLOW``. A directory or file owned by another uid is refused (never chmod-ed
or followed): shared mode then degrades to direct mode with one warning.
"""

from __future__ import annotations

import os
import stat
import tempfile
from typing import List

ENV_RUNTIME_DIR = "CDP_RUNTIME_DIR"


class RuntimeDirError(OSError):
    """The runtime directory or a file in it cannot be used safely."""


def candidates() -> List[str]:
    uid = os.getuid()
    out = []
    explicit = os.environ.get(ENV_RUNTIME_DIR)
    if explicit:
        return [explicit]
    # A predictable name in a shared tmpfs is safe here: ensure_dir() refuses a
    # directory that another uid created first, and never follows a symlink.
    if os.path.isdir("/dev/shm"):  # noqa: S108
        out.append(f"/dev/shm/cdpmp-{uid}")  # noqa: S108
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        out.append(os.path.join(xdg, "cdpmp"))
    out.append(os.path.join(tempfile.gettempdir(), f"cdpmp-{uid}"))
    return out


def ensure_dir(path: str) -> str:
    """Create ``path`` 0700 if missing; verify owner and mode either way."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise RuntimeDirError(f"{path} is not a directory")
    if info.st_uid != os.getuid():
        raise RuntimeDirError(f"{path} is owned by uid {info.st_uid}, not {os.getuid()}")
    if stat.S_IMODE(info.st_mode) != 0o700:
        os.chmod(path, 0o700)
    return path


def runtime_dir() -> str:
    """The first usable candidate; raises :class:`RuntimeDirError` if none is."""
    errors = []
    for path in candidates():
        try:
            return ensure_dir(path)
        except OSError as exc:
            errors.append(f"{path}: {exc}")
    raise RuntimeDirError("; ".join(errors))


def open_private(path: str, flags: int = os.O_RDWR | os.O_CREAT) -> int:
    """Open (creating 0600) a file we own; refuse symlinks and foreign owners."""
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    info = os.fstat(fd)
    if info.st_uid != os.getuid():
        os.close(fd)
        raise RuntimeDirError(f"{path} is owned by uid {info.st_uid}, not {os.getuid()}")
    if stat.S_IMODE(info.st_mode) != 0o600:
        os.fchmod(fd, 0o600)
    return fd


def write_private(path: str, data: bytes) -> None:
    """Atomically replace ``path`` with ``data``, mode 0600."""
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = open_private(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)
