"""Atomic file writes: a file is either the complete new content or not there (nothing half-written).

Temporary files and directories are created beside the target with ``tempfile.mkstemp`` / ``mkdtemp``
(modes 0600 / 0700, so nobody else sees a half-written file); once complete, they get the modes a plain
``open()`` / ``mkdir`` would have given them under the process umask (files ``0o666 & ~umask``,
directories ``0o777 & ~umask``) and are renamed into place.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it where the platform allows.

    On Linux the value comes from ``/proc/self/status`` (thread-safe). Elsewhere the only way to read it is
    to set it and set it back (``os.umask``), which is process-global: another thread creating a file during
    that swap would get the temporary umask, so the swap runs under a module lock and sets the most
    restrictive value (0o077) for the instant it lasts (a file created then is private, never too open).
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: ``0o666 & ~umask``."""
    return 0o666 & ~current_umask()


def directory_mode() -> int:
    """The mode ``os.mkdir(path)`` gives a new directory: ``0o777 & ~umask``."""
    return 0o777 & ~current_umask()


def _apply_plain_modes(root: Path, fmode: int | None = None) -> None:
    """Give ``root`` and every directory / regular file under it the modes plain creation would (links kept).

    ``fmode`` overrides the mode of ``root`` itself when it is a file (an existing file's mode, kept as
    ``open(path, "w")`` keeps it)."""
    dmode = directory_mode()
    fmode = file_mode() if fmode is None else fmode
    if root.is_dir() and not root.is_symlink():
        for parent, dirs, files in os.walk(root):
            for name in files:
                p = os.path.join(parent, name)
                if stat.S_ISREG(os.lstat(p).st_mode):
                    os.chmod(p, fmode)
            for name in dirs:
                p = os.path.join(parent, name)
                if not os.path.islink(p):
                    os.chmod(p, dmode)
        os.chmod(root, dmode)
    elif stat.S_ISREG(os.lstat(root).st_mode):
        os.chmod(root, fmode)


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it to ``path`` (``os.replace``).

    The parent directory is created (plain ``mkdir``, umask applies). The file gets the mode ``open(path,
    "w")`` would leave: an existing regular file's mode is kept, a new file gets ``0o666 & ~umask``
    (whatever mode ``write`` set on the temporary file is replaced). On any error (``KeyboardInterrupt`` included) the temporary file is removed
    and ``path`` is untouched. Returns ``path``. An existing ``path`` is replaced: callers that must not
    overwrite check first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    existing = os.stat(path).st_mode if path.exists() else None
    keep = stat.S_IMODE(existing) if existing is not None and stat.S_ISREG(existing) else None
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        _apply_plain_modes(Path(tmp), keep)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _remove(path: Path) -> None:
    """Remove a file, link or directory tree at ``path`` (nothing if it is not there)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


def atomic_directory(path: str | os.PathLike, write: Callable[[Path], object], overwrite: bool = False) -> Path:
    """Build a directory with ``write(tmp_dir)`` beside ``path``, then move it into place.

    Raises ``FileExistsError`` when ``path`` exists (a file, a directory or a link) and ``overwrite`` is
    false, checked before anything is written. The tree gets the modes plain creation would give it
    (directories ``0o777 & ~umask``, regular files ``0o666 & ~umask``). With ``overwrite`` the old entry (a
    file or a directory) is moved aside only after the new tree is complete, and deleted once the new one is
    in place; if that rename fails the old entry is put back. On any error the temporary directory is
    removed: nothing beside ``path`` is left behind, and ``path`` is untouched unless the final rename
    succeeded.
    """
    path = Path(path)
    if os.path.lexists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it, or choose another path")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    aside: Path | None = None
    try:
        write(tmp)
        _apply_plain_modes(tmp)
        if os.path.lexists(path):
            aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, aside / "old")
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(aside / "old", path)
                raise
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if aside is not None:
            _remove(aside)
    return path
