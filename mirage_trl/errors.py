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
