"""Atomic writes: a crash never leaves a half-written file or folder where a good one would be.

Everything mirage-trl writes (generated data, caches, exports, eval results) goes through
these helpers: write under a temporary name in the same folder, then `os.replace`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import MirageError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def honour_umask(path: str | os.PathLike, folder: bool = False) -> None:
    """`mkstemp` / `mkdtemp` create 0600 / 0700 whatever the umask; give the file what `open` would (0644 /
    0755 under umask 022), as `save_pretrained` files have."""
    os.chmod(path, (0o777 if folder else 0o666) & ~_umask())


def honour_umask_tree(folder: str | os.PathLike) -> None:
    """`honour_umask` for a folder we wrote and everything in it (safetensors writes its files 0600)."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    honour_umask(folder, folder=True)
    for path in folder.rglob("*"):
        if not path.is_symlink():
            honour_umask(path, folder=path.is_dir())


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8"):
    """Open a temporary file beside `path`; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    honour_umask(tmp)
    try:
        with open(tmp, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, obj, indent: int = 2) -> None:
    with atomic_file(path) as f:
        json.dump(obj, f, indent=indent, ensure_ascii=False)
        f.write("\n")


def write_jsonl(path: str | os.PathLike, rows) -> None:
    with atomic_file(path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def check_output_dir(path: str | os.PathLike, overwrite: bool = False, flag: str = "--out") -> Path:
    """Refuse an existing non-empty output folder unless `overwrite` (named after `flag`)."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
        raise MirageError(f"{flag}: {path} already exists and is not empty (pass --overwrite to replace it)")
    return path


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False, flag: str = "--out"):
    """Yield a temporary folder beside `path`; on success it takes `path`'s place, on error it is removed.

    An interrupted writer leaves only a hidden `.name.tmp-*` folder, never a `path` that looks complete.
    """
    path = Path(path)
    check_output_dir(path, overwrite, flag)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    honour_umask(tmp, folder=True)
    try:
        yield tmp
        honour_umask_tree(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
