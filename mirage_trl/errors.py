"""User-facing errors: one clear line that names the place (file:line:field, flag or path).

The CLI prints `MirageError` messages without a stack trace and exits with code 2;
library callers can catch it like any ValueError.
"""

from __future__ import annotations


class MirageError(ValueError):
    """A problem with the user's input, configuration or files (not a bug in mirage-trl)."""


def where(path, line: int | None = None, field: str | None = None) -> str:
    """Format a location as `path:line:field` (the parts that are known)."""
    loc = str(path)
    if line is not None:
        loc += f":{line}"
    if field is not None:
        loc += f":{field}"
    return loc


# What the file system says when the user's disk, quota or folder, not mirage-trl, stops a write.
_STORAGE_ERRNOS = {"ENOSPC", "EDQUOT", "EFBIG", "EROFS", "EACCES", "EPERM"}


def os_error_of(exc: BaseException) -> OSError | None:
    """`exc` itself if it is an `OSError`; the `OSError` a library reports in its message otherwise (safetensors'
    Rust writer says `I/O error: ... (os error 28)`); else None."""
    import os
    import re

    if isinstance(exc, OSError):
        return exc
    found = re.search(r"\(os error (\d+)\)", str(exc))
    return OSError(int(found.group(1)), os.strerror(int(found.group(1)))) if found else None


def storage_error(exc: BaseException) -> MirageError | None:
    """The one-line `MirageError` for an `OSError` of a full disk, a quota, a file-size limit, a read-only or
    forbidden folder (naming the file, or the folder for a temporary file beside it); None for anything else."""
    import errno
    import os

    exc = os_error_of(exc)
    if exc is None or errno.errorcode.get(exc.errno or 0) not in _STORAGE_ERRNOS:
        return None
    name = exc.filename
    if name is None:
        return MirageError(f"cannot write: {exc.strerror or exc}")
    name = os.fspath(name)
    base = os.path.basename(name)
    if base.startswith(".") and ".tmp" in base:  # an atomic write's temporary file: the user knows the folder
        return MirageError(f"cannot write in {os.path.dirname(name) or '.'} ({exc.strerror})")
    if errno.errorcode.get(exc.errno) in ("EACCES", "EPERM"):  # a read or a write: say only what happened
        return MirageError(f"{name}: {exc.strerror}")
    return MirageError(f"cannot write {name} ({exc.strerror})")


def hub_error(exc: BaseException) -> MirageError | None:
    """The one-line `MirageError` for a Hub that cannot be reached or refuses (no network, offline mode, no
    such repo, no permission), recognised by the libraries that raise it; None for anything else."""
    libraries = ("huggingface_hub", "requests", "httpx", "httpcore", "urllib3")  # httpx2, httpcore2 too
    if not any(c.__module__.startswith(libraries) for c in type(exc).__mro__):
        return None
    first = (str(exc).splitlines() or [""])[0]
    # the Hub's client, or the HTTP libraries under it (a tracker's upload too): say what failed, not where
    return MirageError(f"a network request failed ({type(exc).__name__}: {first})")
