"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Every file MoM writes that another process may read (checkpoints, ``model.safetensors``, ``config.json``,
``tokenizer.json``, token caches, reference losses) goes through :func:`atomic_write`. This module imports
nothing from the project, so the model and data packages can use it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def fsync_dir(directory: str | os.PathLike) -> None:
    """fsync a folder, so a rename inside it survives a power loss (a no-op where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not supported (e.g. some network filesystems, Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[Any]], Any], mode: str = "wb") -> Path:
    """Write ``path`` atomically: ``write(f)`` into a temporary file in the same folder, flush, fsync,
    ``os.replace`` over ``path``, fsync the folder. On any error (or interrupt) the temporary file is removed
    and ``path`` is untouched.

    ``f`` is the temporary file opened in ``mode``; a writer that takes a file name rather than a file
    (safetensors' ``save_file``, a tokenizer's ``save``) writes to ``f.name``: the fsync covers it too.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with open(tmp, mode) as f:  # f.name is the temporary file's path
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(path.parent)
    return path


def publish(tmp: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Rename a temporary file that its writer has finished (and fsynced) to ``path``, then fsync the folder:
    for files written piece by piece over a long time (token shards), where :func:`atomic_write`'s one
    callback does not fit."""
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)
    return Path(path)


def replace_dir(tmp: Path, target: Path) -> None:
    """Rename a finished temporary folder to ``target``, replacing an existing one (the old one is moved aside
    first and put back if the rename fails), then fsync the parent folder."""
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    fsync_dir(target.parent)


__all__ = ["atomic_write", "fsync_dir", "publish", "replace_dir"]
