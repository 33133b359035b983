"""Image loading with one-line errors: a missing, unreadable or truncated image names its path and row."""

from __future__ import annotations

import os

from ..errors import MirageError

# Images a processor can take, checked from the header before anything is decoded. Qwen-VL's resizing refuses
# aspect ratios above 200; past the pixel bound an image is a decompression bomb or a mistake (maps and
# photos here are far smaller), and would be resized down to the processor's max_pixels anyway.
MAX_IMAGE_PIXELS = 8192 * 8192
MAX_ASPECT_RATIO = 200


def check_image_header(path, source: str | None = None):
    """Open only the header of `path`: one line naming `source` for an image that is unreadable, a
    decompression bomb, too large or too elongated for the processor. Returns (width, height)."""
    from PIL import Image, UnidentifiedImageError

    prefix = f"{source}: " if source else ""
    try:
        with Image.open(path) as im:
            width, height = im.size
    except FileNotFoundError:
        raise MirageError(f"{prefix}image not found: {path}") from None
    except IsADirectoryError:
        raise MirageError(f"{prefix}image path is a folder, not a file: {path}") from None
    except Image.DecompressionBombError:
        raise MirageError(f"{prefix}refused a decompression bomb: {path}") from None
    except UnidentifiedImageError:
        raise MirageError(f"{prefix}not a readable image: {path}") from None
    except (OSError, SyntaxError, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise MirageError(f"{prefix}broken image {path} ({reason})") from None
    if width < 1 or height < 1:
        raise MirageError(f"{prefix}image {path} is empty ({width}x{height})")
    if width * height > MAX_IMAGE_PIXELS:
        raise MirageError(
            f"{prefix}image {path} has {width}x{height} pixels, more than the {MAX_IMAGE_PIXELS} mirage-trl takes; "
            "resize it"
        )
    if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        raise MirageError(
            f"{prefix}image {path} is {width}x{height}: aspect ratio above {MAX_ASPECT_RATIO}, which the processor "
            "cannot resize"
        )
    return width, height


def load_image(path: str | os.PathLike, source: str | None = None):
    """Open `path` as a fully decoded RGB `PIL.Image`.

    `source` (e.g. `file.jsonl:12:image_input`) is put in front of the message so the user sees
    which row asked for the image. `.load()` runs here so a truncated file fails now, not in a
    collator worker halfway through training.
    """
    from PIL import Image

    if isinstance(path, Image.Image):  # already decoded (an outside harness's visual): as RGB
        return path.convert("RGB")
    prefix = f"{source}: " if source else ""
    check_image_header(path, source)  # missing, unreadable, too large: named before decoding
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (OSError, SyntaxError, ValueError) as e:
        # PIL reports truncation and corrupt chunks as OSError/SyntaxError with a message of its own.
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise MirageError(f"{prefix}broken or truncated image {path} ({reason})") from None
