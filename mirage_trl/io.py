"""Atomic writes: a crash never leaves a half-written file or folder where a good one would be.

Everything mirage-trl writes (generated data, caches, exports, eval results) goes through
these helpers: write under a temporary name in the same folder, then `os.replace`. And whether a name is a
local path or a Hub id (`looks_like_hub_name`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
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
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
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


def check_writable_dir(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Refuse, before any work, an output folder that could not be created or written: one that is a file,
    lies under a file, sits in a folder we may not write, or has a name too long for the file system."""
    path = Path(path)
    for part in path.parts:
        if len(os.fsencode(part)) > 255:  # NAME_MAX of every common file system; stat() itself fails past it
            raise MirageError(
                f"{flag}: the name {part[:40]}... is longer than the file system allows (255 bytes)"
            )
    if len(os.fsencode(str(path.absolute()))) >= 4096:
        raise MirageError(f"{flag}: {str(path)[:60]}... is longer than the file system allows (4096 bytes)")
    if path.exists() and not path.is_dir():
        raise MirageError(f"{flag}: {path} is a file, expected a folder")
    ancestor = path.absolute()
    while not ancestor.exists() and ancestor.parent != ancestor:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise MirageError(f"{flag}: {path} lies under {ancestor}, which is a file")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise MirageError(f"{flag}: cannot write in {ancestor} (permission denied)")
    return path


def check_not_precious(path: str | os.PathLike, flag: str = "--out", inputs: dict | None = None) -> None:
    """Refuse, in one line, an output folder whose replacement would destroy what the user has: the current
    folder or one that holds it, the home folder, the file system's root, or a folder that is (or holds) one of
    the command's `inputs` ({what: path}, e.g. {"--model": ..., "--data": ...})."""
    target = Path(path).resolve()
    cwd, home = Path.cwd().resolve(), Path.home().resolve()
    if target == cwd or target in cwd.parents:
        raise MirageError(f"{flag}: {path} is the current folder or holds it; write into a folder of its own")
    if target in (home, Path(target.anchor)):
        raise MirageError(f"{flag}: {path} is {'your home folder' if target == home else 'the root folder'}; write into a folder of its own")  # fmt: skip
    for what, given in (inputs or {}).items():
        for one in given if isinstance(given, (list, tuple)) else [given]:
            if one is None or looks_like_hub_name(str(one)):
                continue
            source = Path(one).resolve()
            if source == target or target in source.parents:
                raise MirageError(f"{flag}: {path} holds {what} {one}; write the results elsewhere")


def check_output_dir(
    path: str | os.PathLike, overwrite: bool = False, flag: str = "--out", inputs: dict | None = None
) -> Path:
    """Refuse an output folder that cannot be written (`check_writable_dir`), whose replacement would destroy
    the user's files (`check_not_precious`: the current or home folder, a folder holding the command's
    `inputs`), or an existing non-empty one unless `overwrite` (named after `flag`)."""
    path = check_writable_dir(path, flag)
    check_not_precious(path, flag, inputs)
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise MirageError(f"{flag}: {path} already exists and is not empty (pass --overwrite to replace it)")
    return path


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_output_dir(path: str | os.PathLike) -> list[str]:
    """Clean up after writers of `path` that were killed; returns what was done, one phrase each.

    `atomic_dir` writes `.name.tmp-<pid>-*` and, when replacing, moves the old folder to
    `.name.old-<pid>` for the moment between two renames. A leftover of a process that is gone is
    removed; an old folder whose replacement never arrived is moved back to `path`.
    """
    path = Path(path)
    done = []
    if not path.parent.is_dir():
        return done
    for leftover in sorted(path.parent.glob(f".{path.name}.old-*")) + sorted(
        path.parent.glob(f".{path.name}.tmp-*")
    ):
        m = re.match(rf"\.{re.escape(path.name)}\.(old|tmp)-(\d+)", leftover.name)
        if not m or pid_alive(int(m.group(2))):
            continue
        if m.group(1) == "old" and not path.exists():
            os.replace(leftover, path)
            done.append(f"restored {path} from {leftover.name}, left by an interrupted --overwrite")
        else:
            shutil.rmtree(leftover, ignore_errors=True)
            done.append(f"removed {leftover.name}, left by an interrupted run")
    return done


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False, flag: str = "--out"):
    """Yield a temporary folder beside `path`; on success it takes `path`'s place, on error it is removed.

    An interrupted writer leaves only hidden `.name.tmp-<pid>-*` / `.name.old-<pid>` folders, never a
    `path` that looks complete; the next writer of `path` recovers them (`recover_output_dir`): with
    `--overwrite` interrupted between its two renames, `path` is the old folder again.
    """
    path = Path(path)
    for line in recover_output_dir(path):
        logger.warning("%s: %s", flag, line)
    check_output_dir(path, overwrite, flag)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
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
