"""The output-folder rule: one module that every command writing a folder goes through.

A command that writes a folder (`eval --out`, `export --out`, `data vsp|jigsaw --out`, `tiny-model --out`,
`analyze-latents --out`, `experiment --out`, a training's `output_dir`) never deletes or overwrites what it did
not write:

1. `check_output_dir` refuses, in one line and before any work, a folder that cannot be written, the current
   folder or one holding it, the home folder, the root, a folder that is or holds one of the command's inputs,
   and an existing non-empty folder, unless `--overwrite` and the folder is one mirage-trl wrote and holds
   nothing else (`foreign_entries`: its marker file lists what the writer put there);
2. `atomic_dir` writes the new folder beside the old one under a hidden name, puts the marker in it, and
   swaps it in at the end by two renames: an interrupted writer leaves the old folder as it was;
3. `out_lock` / `output_lock` let one process at a time write a folder: a second one is refused naming it;
4. `check_training_output_dir` refuses a training `output_dir` holding files no training wrote (a training is
   recognised by the Trainer's own files, not a marker, since the folder is what goes to the Hub), unless it
   holds a run to resume (whose arguments `checkpoints.check_same_run` then compares).

Checkpoint rotation (`checkpoints.rotate_own_checkpoints`) deletes only checkpoints a run wrote.
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

from .checkpoints import own_checkpoints
from .errors import MirageError
from .io import atomic_file, honour_umask, honour_umask_tree, looks_like_hub_name, pid_alive

logger = logging.getLogger(__name__)

# In every folder a command writes whole (`atomic_dir`): who wrote it and the entries it wrote.
MARKER = ".mirage-trl.json"
LOCK_FILE = ".mirage-trl.lock"  # inside a training output_dir; an --out's lock is `.<name>.lock` beside it
_OURS = {MARKER, LOCK_FILE}


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


def check_output_file(path: str | os.PathLike, flag: str = "--out", inputs: dict | None = None) -> Path:
    """A single file a command writes (a plot): not a folder, in a folder that can be written, and none of the
    command's `inputs`; one line naming `flag` otherwise."""
    path = Path(path)
    if path.is_dir():
        raise MirageError(f"{flag}: {path} is a folder, expected a file name")
    check_writable_dir(path.parent if str(path.parent) else Path("."), flag)
    for what, given in (inputs or {}).items():
        if given is not None and Path(given).resolve() == path.resolve():
            raise MirageError(f"{flag}: {path} is {what}; write elsewhere")
    return path


def read_marker(folder: str | os.PathLike) -> dict | None:
    """The marker of a folder mirage-trl wrote, or None (no marker, or not one of ours)."""
    try:
        value = json.loads((Path(folder) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) and value.get("written_by") == "mirage-trl" else None


def write_marker(folder: str | os.PathLike, command: str, entries: list[str]) -> None:
    """Mark `folder` as written by mirage-trl's `command`, with the top-level names it wrote."""
    from . import __version__  # the package's version; the top package only maps names lazily

    marker = {
        "written_by": "mirage-trl",
        "command": command,
        "version": __version__,
        "entries": sorted(entries),
    }
    with atomic_file(Path(folder) / MARKER) as f:
        json.dump(marker, f, indent=2)
        f.write("\n")


def foreign_entries(folder: str | os.PathLike) -> list[str]:
    """What `folder` holds that mirage-trl did not write there: everything, in a folder without a marker; what
    its marker does not list, otherwise."""
    folder = Path(folder)
    names = sorted(e.name for e in folder.iterdir() if e.name not in _OURS)
    marker = read_marker(folder)
    entries = set(marker.get("entries") or []) if marker else set()
    return [n for n in names if n not in entries]


def _listing(names: list[str]) -> str:
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")


def check_output_dir(
    path: str | os.PathLike, overwrite: bool = False, flag: str = "--out", inputs: dict | None = None
) -> Path:
    """Refuse an output folder that cannot be written (`check_writable_dir`), whose replacement would destroy
    the user's files (`check_not_precious`: the current or home folder, a folder holding the command's
    `inputs`), an existing non-empty one unless `overwrite` (named after `flag`), and, even with `overwrite`,
    one holding anything mirage-trl did not write there."""
    path = check_writable_dir(path, flag)
    check_not_precious(path, flag, inputs)
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise MirageError(
                f"{flag}: {path} already exists and is not empty (pass --overwrite to replace it)"
            )
        foreign = foreign_entries(path)
        if foreign:
            raise MirageError(
                f"{flag}: {path} holds what mirage-trl did not write there ({_listing(foreign)}); --overwrite "
                f"replaces only a folder mirage-trl wrote: give another {flag}"
            )
    return path


# A training output_dir is recognised by what the Trainer writes there itself (no marker: the Hub upload of an
# output_dir would carry it): its state and arguments, or checkpoints a mirage-trl run wrote.
TRAINING_FILES = ("trainer_state.json", "training_args.bin")


def check_training_output_dir(path: str | os.PathLike, inputs: dict | None = None) -> Path:
    """A training `output_dir`: writable, not the current, home or an input's folder, and either new, empty, a
    folder a training wrote (`TRAINING_FILES`) or one holding a mirage-trl run's checkpoints to resume; one
    holding anything else is refused, so no README.md, model file or `checkpoint-N` of the user's is
    overwritten."""
    flag = "--output_dir"
    path = check_writable_dir(path, flag)
    check_not_precious(path, flag, inputs)
    if not path.is_dir():
        return path
    names = sorted(e.name for e in path.iterdir() if e.name not in _OURS)
    if not names or any((path / f).is_file() for f in TRAINING_FILES) or own_checkpoints(path):
        return path
    raise MirageError(
        f"{flag} {path}: holds what no training wrote ({_listing(names)}); give an empty or new {flag}"
    )


@contextlib.contextmanager
def _hold(lock: Path, folder, flag: str):
    """Hold `lock` (this process's id in it) while writing `folder`: a second process is refused in one line
    naming the folder; a lock left by a process that is gone is taken over; this process may nest."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                pid = int(lock.read_text(encoding="utf-8").strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid == os.getpid():
                yield  # held by this process already (an eval's whole run around its atomic write)
                return
            if pid and pid_alive(pid):
                raise MirageError(
                    f"{flag} {folder}: another process (pid {pid}) is writing there; wait for it to finish or "
                    f"give another {flag}"
                ) from None
            if attempt:
                raise MirageError(
                    f"{flag} {folder}: cannot take {lock}; remove it if no run is writing there"
                ) from None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock)  # left by a process that is gone
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        break
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)


def output_lock(folder, flag: str = "--output_dir"):
    """Hold `folder/.mirage-trl.lock` while a training writes into `folder`."""
    return _hold(Path(folder) / LOCK_FILE, folder, flag)


def out_lock(path, flag: str = "--out"):
    """Hold `.<name>.lock` beside `path` while a command writes `path` (and its `<path>.partial.jsonl`)."""
    path = Path(path)
    return _hold(path.absolute().parent / f".{path.name}.lock", path, flag)


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
def atomic_dir(path: str | os.PathLike, overwrite: bool = False, flag: str = "--out", *, command: str):
    """Yield a temporary folder beside `path`; on success it takes `path`'s place, on error it is removed.

    The folder gets the marker (`command`, the entries written), so a later `--overwrite` knows it. An
    interrupted writer leaves only hidden `.name.tmp-<pid>-*` / `.name.old-<pid>` folders, never a
    `path` that looks complete; the next writer of `path` recovers them (`recover_output_dir`): with
    `--overwrite` interrupted between its two renames, `path` is the old folder again.
    """
    path = Path(path)
    with out_lock(path, flag):
        for line in recover_output_dir(path):
            logger.warning("%s: %s", flag, line)
        check_output_dir(path, overwrite, flag)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
        honour_umask(tmp, folder=True)
        try:
            yield tmp
            write_marker(tmp, command, [e.name for e in tmp.iterdir() if e.name != MARKER])
            honour_umask_tree(tmp)
            if path.exists():
                check_output_dir(
                    path, overwrite, flag
                )  # what the user put there meanwhile is not swapped away
                old = path.with_name(f".{path.name}.old-{os.getpid()}")
                os.replace(path, old)
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, OSError) and exc.filename is None and exc.errno:
                # a write that failed (a full disk) names no file: name the folder being written
                raise OSError(exc.errno, exc.strerror, str(path)) from exc
            raise


def relocate_references(folder: str | os.PathLike, final: str | os.PathLike) -> None:
    """In the settings and cards written under `folder` (JSON, Markdown), make the paths that name `folder`
    name `final`, where `atomic_dir` is about to move it (a stage's recorded base model, for one)."""
    old, new = str(Path(folder).resolve()), str(Path(final).resolve())
    for path in Path(folder).rglob("*"):
        if path.suffix in (".json", ".md") and path.is_file() and not path.is_symlink():
            text = path.read_text(encoding="utf-8")
            if old in text:
                with atomic_file(path) as f:
                    f.write(text.replace(old, new))
