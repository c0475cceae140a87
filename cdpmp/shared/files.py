"""The per-user runtime directory of shared mode and every file in it but the ring.

Files: ``ring`` and ``ring.lock`` (:mod:`.ring`), ``uploader.lock`` (the election),
``uploader.log``, ``sources.json`` (what the uploader needs to send for each source,
write keys included: 0600, never argv or a log line) and ``dead-letter.jsonl``
(batches the endpoint refused for good).

Location, first that works: ``$CDP_RUNTIME_DIR``; ``/dev/shm/cdpmp-<uid>`` (tmpfs, so
the ring is memory); ``$XDG_RUNTIME_DIR/cdpmp``; ``<tempdir>/cdpmp-<uid>``. The
directory must be 0700 and owned by us; every file in it is created 0600 with
``O_NOFOLLOW``. A directory or file owned by another uid is refused (never chmod-ed
or followed): shared mode then degrades to direct mode with one warning.
"""

from __future__ import annotations

import base64
import json
import os
import stat
import tempfile
import time
from typing import Any, Dict, List

from .._options import host_settings

SOURCES = "sources.json"
DEAD_LETTERS = "dead-letter.jsonl"
UPLOADER_LOG = "uploader.log"
UPLOADER_LOCK = "uploader.lock"


class RuntimeDirError(OSError):
    """The runtime directory or a file in it cannot be used safely."""


def candidates() -> List[str]:
    uid = os.getuid()
    out = []
    explicit = host_settings().runtime_dir
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
    """Create ``path`` 0700 if missing; verify owner and mode either way. The mode of
    a directory we did not create is never changed (``CDP_RUNTIME_DIR=/dev/shm`` run as
    root must not make the real one private): a wrong mode is refused instead."""
    created = False
    try:
        os.mkdir(path, 0o700)
        created = True
    except FileExistsError:
        pass
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise RuntimeDirError(f"{path} is not a directory")
    if info.st_uid != os.getuid():
        raise RuntimeDirError(f"{path} is owned by uid {info.st_uid}, not {os.getuid()}")
    if stat.S_IMODE(info.st_mode) != 0o700:
        if not created:
            raise RuntimeDirError(f"{path} has mode {stat.S_IMODE(info.st_mode):o}; shared mode needs 700")
        os.chmod(path, 0o700)  # mkdir's mode was narrowed by the umask: ours, so fix it
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
    """Open (creating 0600) a regular file we own; refuse symlinks, FIFOs, devices and
    foreign owners. ``O_NONBLOCK``: opening a FIFO put in a file's place must not hang
    (it has no effect on a regular file)."""
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o600)
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise RuntimeDirError(f"{path} is not a regular file")
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


def read_sources(directory: str) -> Dict[str, Dict[str, Any]]:
    """Source id (as a string) → the entry its producer wrote; ``{}`` if unreadable."""
    try:
        fd = open_private(os.path.join(directory, SOURCES), os.O_RDONLY)
    except FileNotFoundError:
        return {}
    with os.fdopen(fd, "rb") as fh:
        raw = fh.read()
    try:
        data = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def write_source(directory: str, sid: int, entry: Dict[str, Any]) -> None:
    """Add or replace one source entry. The caller holds the ring lock."""
    sources = read_sources(directory)
    if sources.get(str(sid)) != entry:
        sources[str(sid)] = entry
        write_private(os.path.join(directory, SOURCES), json.dumps(sources).encode())


#: Bytes the dead-letter file may reach; what would pass it is counted, not written.
DEAD_LETTER_LIMIT = 8 << 20
#: Free space the dead letters always leave on their file system: at least this, or a
#: tenth of its size if larger (a 2 MiB tmpfs was once filled to its last byte: the
#: uploader's log, the sources file and every other tenant of /dev/shm need room).
FREE_FLOOR = 256 << 10


def append_dead_letter(directory: str, source: int, error: object, batch: List[bytes]) -> bool:
    """Append one refused batch to the dead-letter file: each message as JSON, or as
    ``{"raw": base64}`` when it is not JSON (damaged bytes). False, writing nothing,
    when the line would take the file past :data:`DEAD_LETTER_LIMIT` or its file
    system below :func:`free_floor` after it: the caller counts the overflow."""
    line: Dict[str, Any] = {"time": time.time(), "source": source, "error": str(error), "count": len(batch)}
    status = getattr(error, "status", None)
    if isinstance(status, int):  # an APIError: its producers rebuild it (.notices)
        line.update(status=status, code=getattr(error, "code", ""), message=getattr(error, "message", ""))
    short = json.dumps({**line, "batch": []}).encode() + b"\n"
    data = json.dumps({**line, "batch": [_entry(m) for m in batch]}).encode() + b"\n"
    fd = open_private(os.path.join(directory, DEAD_LETTERS), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        vfs = os.fstatvfs(fd)
        size = os.fstat(fd).st_size
        for attempt in (data, short):  # without its messages, the count still reaches them
            room = vfs.f_bavail * vfs.f_frsize - len(attempt)
            if size + len(attempt) <= DEAD_LETTER_LIMIT + (
                4096 if attempt is short else 0
            ) and room >= free_floor(vfs):
                os.write(fd, attempt)
                return attempt is data
        return False
    finally:
        os.close(fd)


def free_floor(vfs: os.statvfs_result) -> int:
    """Bytes the dead letters leave free on a file system (see :data:`FREE_FLOOR`)."""
    return max(FREE_FLOOR, vfs.f_blocks * vfs.f_frsize // 10)


def _entry(message: bytes) -> Any:
    try:
        return json.loads(message)
    except ValueError:
        return {"raw": base64.b64encode(message).decode()}


#: Bytes ``uploader.log`` may reach: it lives on the ring's tmpfs, which a container
#: may give 2 MiB in all. Past it the uploader drops lines (one notice says so); each
#: uploader that starts keeps the last :data:`LOG_KEPT` bytes of an older, longer log.
LOG_LIMIT = 256 << 10
LOG_KEPT = 16 << 10


def open_log(directory: str) -> int:
    """The uploader's log file, opened for appending (0600), cut to its last
    :data:`LOG_KEPT` bytes when a previous uploader left it at the limit."""
    fd = open_private(os.path.join(directory, UPLOADER_LOG), os.O_RDWR | os.O_CREAT | os.O_APPEND)
    size = os.fstat(fd).st_size
    if size > LOG_LIMIT - LOG_KEPT:
        tail = os.pread(fd, LOG_KEPT, size - LOG_KEPT)
        os.ftruncate(fd, 0)
        os.write(fd, b"(earlier lines cut)\n" + tail[tail.find(b"\n") + 1 :])
    return fd


def path(directory: str, name: str) -> str:
    return os.path.join(directory, name)
