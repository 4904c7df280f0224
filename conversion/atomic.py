"""Crash-safe writes: build the output next to its destination, then rename it into place.

An interrupted write leaves the previous good file or directory untouched and no partial output
behind (``os.replace`` is atomic within one filesystem).
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def _publish_permissions(path: Path, directory: bool) -> None:
    """mkdtemp/mkstemp create 0700/0600 entries; give the result the modes a plain mkdir/open would
    (0777/0666 less the umask) so exports and checkpoints stay readable on shared clusters."""
    umask = _umask()
    os.chmod(path, (0o777 if directory else 0o666) & ~umask)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``path``, on error it is removed."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True (CLI: --overwrite) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        _publish_permissions(tmp, directory=True)
        yield tmp
        replace_directory(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_directory(tmp: Path, path: Path) -> None:
    """Publish the finished directory ``tmp`` as ``path``: fsync its files, rename it into place, drop the
    old one. Two renames (POSIX cannot swap directories atomically): a kill between them leaves the
    previous version intact under ``.<name>.old-*``."""
    _publish_permissions(tmp, directory=True)
    _fsync_tree(tmp)
    if path.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
        os.replace(path, trash / path.name)
        os.replace(tmp, path)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, path)
    fsync_directory(path.parent)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling file path; on success it is fsynced and renamed over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        _publish_permissions(tmp, directory=False)
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_directory(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def fsync_directory(directory: Path) -> None:
    """Make a rename inside ``directory`` durable: without it a power loss right after ``os.replace``
    can bring back the old entry (POSIX; Windows cannot open directories and needs no such step)."""
    if os.name != "posix":
        return
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete the temporaries an interrupted ``atomic_file(path)``/``atomic_directory(path)`` left
    behind (a SIGKILL runs no cleanup); call it from the only writer of ``path``."""
    path = Path(path)
    stale = sorted(path.parent.glob(f".{glob.escape(path.name)}.tmp-*")) if path.parent.is_dir() else []
    for entry in stale:
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
    return stale


def _fsync_tree(root: Path) -> None:
    for file in root.rglob("*"):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
