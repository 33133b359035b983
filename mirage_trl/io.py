"""Atomic file writes: a crash never leaves a half-written file where a good one would be.

Every text and weight file mirage-trl writes itself (JSON, JSONL, cards, reports, plots, caches) goes through
`atomic_file`: write under a temporary name in the same folder, then `os.replace`. Folders follow the
output-folder rule in `folders`. Also: file modes that honour the umask, and whether a name is a local path or
a Hub id (`looks_like_hub_name`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from pathlib import Path

from .errors import MirageError

logger = logging.getLogger(__name__)


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
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.filename is None and exc.errno:
            # a write that failed (full disk, size limit) names no file: name the one that was being written
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise


def read_json(path: str | os.PathLike) -> dict:
    """A JSON object from a file; anything else is one line naming the file."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MirageError(f"{path}: cannot read it as JSON ({exc})") from None
    if not isinstance(value, dict):
        raise MirageError(f"{path}: expected a JSON object")
    return value


def write_json(path: str | os.PathLike, obj, indent: int = 2) -> None:
    with atomic_file(path) as f:
        json.dump(obj, f, indent=indent, ensure_ascii=False)
        f.write("\n")


def write_jsonl(path: str | os.PathLike, rows) -> None:
    with atomic_file(path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def looks_like_hub_name(name: str) -> bool:
    """`org/name` that is not a path: never absolute, never `./...`, and its first part is not a local
    folder, so `outputs/exprot` (a typo under an existing `outputs/`) fails at once instead of waiting on
    the Hub."""
    return (
        not os.path.isabs(name)
        and not name.startswith(".")
        and name.count("/") == 1
        and not name.endswith("/")
        and not Path(name).exists()
        and not Path(name.split("/", 1)[0]).is_dir()
    )


def save_figure(fig, path: str | os.PathLike, **kwargs) -> None:
    """A matplotlib figure saved atomically (its format from the file's suffix): a plot drawn again over a good
    one never leaves half a PNG."""
    path = Path(path)
    with atomic_file(path, mode="wb", encoding=None) as f:
        fig.savefig(f, format=path.suffix.lstrip(".") or "png", **kwargs)
