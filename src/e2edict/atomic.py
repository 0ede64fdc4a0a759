"""Files that are never half written: the one way e2edict writes a file a crash must not tear.

`write_atomic` writes to a temporary name beside the target, flushes it to disk (fsync) and renames
it over the target, so a reader sees the old file or the new one, never a part. `write_folder_atomic`
does the same for a folder written whole (a checkpoint, token shards, an adapter): filled under a
temporary name beside it, every file fsynced, renamed into place."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, fsync it, then rename it to ``path``;
    the temporary file is removed if anything fails."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        fsync(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_folder_atomic(folder: Path, fill: Callable[[Path], None]) -> None:
    """``fill(tmp)`` into an empty temporary folder beside ``folder``, fsync its files, then put it
    in ``folder``'s place (replacing what was there); nothing is left behind if anything fails,
    and what a killed writer left (its temporary folder) is removed by the next. One writer per folder."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    for stale in folder.parent.glob(f".{folder.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        fill(tmp)
        for f in tmp.rglob("*"):
            if f.is_file():
                fsync(f)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
        fsync(folder.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def fsync(path: Path) -> None:
    """Flush a file, or a folder's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
