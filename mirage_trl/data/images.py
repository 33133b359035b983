"""Image loading with one-line errors: a missing, unreadable or truncated image names its path and row."""

from __future__ import annotations

import os

from ..errors import MirageError


def load_image(path: str | os.PathLike, source: str | None = None):
    """Open `path` as a fully decoded RGB `PIL.Image`.

    `source` (e.g. `file.jsonl:12:image_input`) is put in front of the message so the user sees
    which row asked for the image. `.load()` runs here so a truncated file fails now, not in a
    collator worker halfway through training.
    """
    from PIL import Image, UnidentifiedImageError

    prefix = f"{source}: " if source else ""
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except FileNotFoundError:
        raise MirageError(f"{prefix}image not found: {path}") from None
    except IsADirectoryError:
        raise MirageError(f"{prefix}image path is a folder, not a file: {path}") from None
    except UnidentifiedImageError:
        raise MirageError(f"{prefix}not a readable image: {path}") from None
    except (OSError, SyntaxError, ValueError) as e:
        # PIL reports truncation and corrupt chunks as OSError/SyntaxError with a message of its own.
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise MirageError(f"{prefix}broken or truncated image {path} ({reason})") from None
