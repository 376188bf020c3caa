"""Writing output files so that a planted link, a full disk or a crash never does harm.

Every file genailab writes goes through :func:`atomic_file` or :func:`atomic_path`: the bytes go
to a new temporary file with a unique name in the target folder (``tempfile.mkstemp``, which opens
with ``O_CREAT | O_EXCL | O_NOFOLLOW``), are flushed to disk, and then take the final name with
``os.replace``. So

- a symbolic link planted at the final name is never followed (and is refused with a clear error
  before anything is computed, see :func:`check_output_file` and :func:`check_output_folder`);
- a failed write (disk full, folder removed) leaves any earlier file under the final name as it
  was and no partial or empty file behind;
- a process killed mid-write leaves only a temporary file whose name carries the writer's PID;
  :func:`remove_orphans` deletes those of dead processes.

:class:`FolderLock` keeps a second process from writing into a folder that one is already using.
This module is the bottom layer: it imports nothing of genailab but its error types.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import socket
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

from genailab.errors import CheckpointError, ConfigError

LOCK_FILE = ".genailab.lock"
_PROBE_BYTES = 4096  # written and removed by the writability probe, so a full disk shows up early
# Temporary names: "." + final name + "." + writer's PID + "." + mkstemp's 8 random characters + ".tmp"
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[A-Za-z0-9_]{8}\.tmp$")
_HELD: dict[str, int] = {}  # folders this process holds the lock of -> how many nested holders


# -- checks before the work starts ------------------------------------------------------------
def user_path(path: str | os.PathLike) -> Path:
    """``path`` as a Path with ``~`` expanded (as a shell would); an empty path is refused (it would
    silently mean the working folder)."""
    if not str(os.fspath(path)).strip():
        raise ConfigError("The path is empty; give a file or folder name (an empty one would mean the current folder).")
    return Path(path).expanduser()


def refuse_link(path: str | os.PathLike) -> Path:
    """Raise :class:`CheckpointError` if ``path`` is a symbolic link; returns ``path`` (``~`` expanded)."""
    path = user_path(path)
    if path.is_symlink():
        target = os.readlink(path)
        raise CheckpointError(
            f"{path} is a symbolic link to {target}; genailab does not write through links, since anyone who can "
            f"write into {path.parent} could point one at another of your files. Remove the link, or give the real "
            f"path ({path.resolve()}) if that is where the output should go."
        )
    return path


def probe_writable(directory: str | os.PathLike) -> Path:
    """Prove that a file can be written in ``directory`` (a uniquely named probe, written and removed)."""
    directory = Path(directory)
    try:
        fd, probe = tempfile.mkstemp(prefix=f".genailab-probe.{os.getpid()}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise _cannot_write(directory, exc) from exc
    try:
        _write_all(fd, b"0" * _PROBE_BYTES)
        os.fsync(fd)
    except OSError as exc:
        raise _cannot_write(directory, exc) from exc
    finally:
        os.close(fd)
        Path(probe).unlink(missing_ok=True)
    return directory


def check_output_folder(directory: str | os.PathLike, *, names: Iterable[str] = ()) -> Path:
    """Create ``directory`` if needed and check, before long work, that genailab can write into it.

    Refuses a folder that is a file or a symbolic link, a folder that cannot be written (read-only,
    full), and any of ``names`` inside it that is a link or a folder. Returns the folder.
    """
    directory = refuse_link(directory)
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"Cannot write to {directory}: it is a file, not a folder; choose a folder path.")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _cannot_write(directory, exc) from exc
    for name in names:
        _check_file_name(directory / name)
    return probe_writable(directory)


def check_output_file(path: str | os.PathLike) -> Path:
    """Check, before long work, that ``path`` can be written as a file: its folder is created if
    needed and writable, and ``path`` is neither a folder nor a symbolic link. Returns ``path``."""
    path = user_path(path)
    _check_file_name(path)
    if path.parent.exists() and not path.parent.is_dir():
        raise CheckpointError(f"Cannot write {path}: {path.parent} is a file, not a folder; choose another path.")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _cannot_write(path.parent, exc) from exc
    probe_writable(path.parent)
    return path


def _check_file_name(path: Path) -> None:
    refuse_link(path)
    if path.is_dir():
        raise CheckpointError(
            f"Cannot write the file {path}: a folder of that name exists; remove it or choose another name."
        )


# -- writing -----------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary path beside ``path`` for writers that take a file name (h5ad);
    it replaces ``path`` when the block ends without error, and is removed otherwise.

    Raises :class:`CheckpointError` (any earlier file at ``path`` unchanged) if the write fails
    with an ``OSError`` or, as torch and h5py report disk errors, a ``RuntimeError``.
    """
    path = Path(path)
    _check_file_name(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise write_error(path, exc) from exc
    try:
        yield Path(tmp)
        _finish(tmp)
        refuse_link(path)  # a link planted while we worked is refused too (os.replace would not follow it)
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, (OSError, RuntimeError)) and not isinstance(exc, CheckpointError):
            raise write_error(path, exc) from exc
        raise


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing (``mode`` ``"wb"`` or ``"w"``, text as
    UTF-8 with untranslated newlines); it replaces ``path`` when the block ends without error.
    Failures as in :func:`atomic_path`."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_file writes with mode 'wb' or 'w', not {mode!r}")
    with atomic_path(path) as tmp:
        options = {} if mode == "wb" else {"encoding": "utf-8", "newline": ""}
        with open(tmp, mode, **options) as handle:
            yield handle


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_file`); returns ``path``."""
    with atomic_file(path) as handle:
        handle.write(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns ``path``."""
    return write_bytes(path, text.encode("utf-8"))


def remove_orphans(directory: str | os.PathLike) -> list[Path]:
    """Delete temporary files in ``directory`` left by writers that were killed (their PID is no
    longer running); returns the paths removed."""
    removed = []
    with contextlib.suppress(OSError), os.scandir(directory) as entries:
        for entry in entries:
            match = _TEMP_NAME.match(entry.name)
            if match and entry.is_file(follow_symlinks=False) and not _alive(int(match["pid"])):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
    return removed


def write_error(path: Path, exc: BaseException) -> CheckpointError:
    """The error for a write of ``path`` that failed with ``exc`` (disk full, folder gone...)."""
    reason = getattr(exc, "strerror", None) or (str(exc).splitlines() or [type(exc).__name__])[0]
    return CheckpointError(
        f"Could not write {path} ({reason}); free disk space or choose another folder. Any earlier "
        f"{path.name} there is unchanged."
    )


def _cannot_write(directory: Path, exc: OSError) -> CheckpointError:
    return CheckpointError(
        f"Cannot write to {directory} ({exc.strerror or exc}); choose another output folder or free disk space."
    )


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _finish(path: str) -> None:
    """Give the temporary file the usual permissions (mkstemp makes it private) and flush it to disk;
    opened without following links, in case one replaced it meanwhile."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# -- one writer per folder ---------------------------------------------------------------------
class FolderLock:
    """Exclusive use of an output folder by this process, recorded in ``<folder>/.genailab.lock``.

    The lock file holds the owner's PID and host name. A second process gets a
    :class:`CheckpointError` naming the owner; a lock whose process has died (same host) is stale
    and taken over. The lock is re-entrant within a process and released when the outermost
    holder leaves the ``with`` block (also on errors and Ctrl-C). Entering removes temporary files
    that killed writers left in the folder.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_FILE
        self._key = ""

    def __enter__(self) -> FolderLock:
        self._key = os.path.realpath(self.directory)
        if _HELD.get(self._key):
            _HELD[self._key] += 1
            return self
        for _ in range(2):  # a second try after removing a stale lock
            if self._create():
                break
            owner = self._owner()
            if owner is not None and owner[1] == socket.gethostname() and not _alive(owner[0]):
                self.path.unlink(missing_ok=True)
                continue
            who = f"PID {owner[0]} on {owner[1]}" if owner else "an unknown process"
            raise CheckpointError(
                f"{self.directory} is in use by another genailab process ({who}); wait for it to finish or write to "
                f"another folder. If that process is no longer running, delete {self.path}."
            )
        _HELD[self._key] = 1
        remove_orphans(self.directory)
        return self

    def __exit__(self, *exc_info) -> None:
        _HELD[self._key] -= 1
        if _HELD[self._key] == 0:
            del _HELD[self._key]
            if self._owner() == (os.getpid(), socket.gethostname()):
                self.path.unlink(missing_ok=True)

    def _create(self) -> bool:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        try:
            fd = os.open(self.path, flags, 0o644)
        except FileExistsError:
            return False
        except OSError as exc:
            raise _cannot_write(self.directory, exc) from exc
        try:
            _write_all(fd, f"{os.getpid()}\n{socket.gethostname()}\n".encode())
        finally:
            os.close(fd)
        return True

    def _owner(self) -> tuple[int, str] | None:
        """(PID, host) written in the lock file, or None if it is unreadable or not one of ours."""
        try:
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                refuse_link(self.path)
            return None
        with os.fdopen(fd, "rb") as handle:
            lines = handle.read(1024).decode(errors="replace").splitlines()
        if len(lines) < 2 or not lines[0].isdigit():
            return None
        return int(lines[0]), lines[1]


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
