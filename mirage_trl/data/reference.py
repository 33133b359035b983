"""Load the reference Mirage JSONL format into the row schema every other part of mirage-trl uses.

One JSON object per line (see docs, section 1.1): `text_input` with `<image>` markers,
`image_input`, and for training rows `text_output` with `<output_image>` markers and
`image_output`. Each loaded row has:

- `messages`: TRL conversation; the user turn is `text_input` split at `<image>` into text and
  `{"type": "image"}` entries; the assistant turn (only when `text_output` exists) is one text
  entry with the `<output_image>` markers kept verbatim (the collator expands them).
- `images` / `helper_images`: absolute paths, one per `<image>` / `<output_image>` (not decoded).
- `helper_texts`: what each helper image shows, in words (optional field `image_output_text`, a string or a
  list, one per helper image; [] when absent): the target of the auxiliary text decoding (`latent_aux_text`).
- `prompt_text`, `completion_text` ("" for test rows), `benchmark`, `answer` ("" if unknown),
  `map_desc` (JSON string or ""), `map_id`, `level`, `source` (`"<path>:<line>"`).

Every malformed row raises a one-line `MirageError` naming `file:line:field`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ..errors import MirageError, where
from ..grading import BENCHMARKS, GRID_BENCHMARKS, check_benchmark, extract_boxed
from ..stages import STAGE1, STAGES
from .images import check_image_header
from .vsp import GROUNDING_QUESTION

OUTPUT_IMAGE_MARKER = "<output_image>"  # where a row puts a helper image; the collator makes it a latent span

IMAGE_MARKER = "<image>"

_LEVEL_IN_PATH = re.compile(r"level_?(\d+)")
# Special tokens written literally in a row's text (the latent tokens, vision/image placeholders, chat-template
# markers such as <|im_start|>) would become real special tokens: an orphan latent slot, an image placeholder
# without an image, or a turn boundary inside the text.
RESERVED_TOKEN = re.compile(r"<\|[A-Za-z0-9_]+\|>")


def check_unicode(value: str, loc: str) -> None:
    """A lone surrogate (JSON allows `\\ud800`) is invalid Unicode that no tokenizer or file writer can take."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise MirageError(f"{loc}: invalid Unicode (a lone surrogate at column {e.start + 1})") from None


def check_text(value: str, loc: str) -> None:
    """One line naming `loc` for text that cannot be trained on as it is: a reserved token written
    literally, or invalid Unicode."""
    m = RESERVED_TOKEN.search(value)
    if m:
        raise MirageError(
            f"{loc}: contains the reserved token {m.group(0)!r} literally (column {m.start() + 1}); special "
            "tokens are added by mirage-trl and the chat template, never written in the data"
        )
    check_unicode(value, loc)


def _features():
    from datasets import Features, Value

    try:
        from datasets import List
    except ImportError:  # datasets < 4 spells it Sequence
        from datasets import Sequence as List

    text_or_image = {"type": Value("string"), "text": Value("string")}
    return Features(
        {
            "messages": List({"role": Value("string"), "content": List(text_or_image)}),
            "images": List(Value("string")),
            "helper_images": List(Value("string")),
            "helper_texts": List(Value("string")),
            "prompt_text": Value("string"),
            "completion_text": Value("string"),
            "benchmark": Value("string"),
            "answer": Value("string"),
            "map_desc": Value("string"),
            "map_id": Value("string"),
            "level": Value("int64"),
            "source": Value("string"),
        }
    )


def _default_root(jsonl: Path, image_path: str) -> Path:
    """Reference layout: `./data/...` is relative to the folder holding the JSONL's nearest `data` ancestor."""
    if image_path.startswith(("./data/", "data/")):
        for parent in jsonl.resolve().parents:
            if parent.name == "data":
                return parent.parent
    return jsonl.resolve().parent


def _paths(obj: dict, field: str, loc) -> list[str]:
    value = obj.get(field)
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(p, str) and p for p in value):
        raise MirageError(f"{loc(field)}: expected a path or a list of paths, got {_short(value)}")
    return value


def _helper_texts(obj: dict, num_helpers: int, loc) -> list[str]:
    """`image_output_text`: one text per helper image (a lone string for one), or nothing."""
    value = obj.get("image_output_text")
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(t, str) and t for t in value):
        raise MirageError(
            f"{loc('image_output_text')}: expected a text or a list of texts, got {_short(value)}"
        )
    if len(value) != num_helpers:
        raise MirageError(
            f"{loc('image_output_text')}: {len(value)} text(s) for {num_helpers} helper image(s) (image_output)"
        )
    for i, text in enumerate(value):
        check_text(text, loc(f"image_output_text[{i}]"))
    return value


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _parse_map(value, loc) -> list[list[int]]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise MirageError(f"{loc('map_desc')}: not a grid (JSON list of lists)") from None
    ok = (
        isinstance(value, list)
        and value
        and all(
            isinstance(r, list) and r and all(type(c) is int and c in (-1, 0, 1, 2) for c in r) for r in value
        )
    )
    if not ok:
        raise MirageError(
            f"{loc('map_desc')}: expected a grid of -1/0/1/2 (list of lists), got {_short(value)}"
        )
    flat = [c for r in value for c in r]
    if flat.count(1) != 1 or flat.count(2) != 1:
        raise MirageError(f"{loc('map_desc')}: a grid needs exactly one start (1) and one goal (2)")
    return value


def _infer_benchmark(text_input: str, has_map: bool, loc) -> str:
    # VSP rows: reasoning prompts quote the plan to judge ("Full Action Plan: ..."); planning asks for one.
    if "Full Action Plan" in text_input:
        return "vsp_reasoning"
    if GROUNDING_QUESTION in text_input:
        return "vsp_grounding"
    if has_map or "action plan" in text_input.lower():
        return "vsp_planning"
    raise MirageError(
        f"{loc(None)}: cannot tell the benchmark of this row; pass benchmark= (one of {', '.join(BENCHMARKS)})"
    )


def content_parts(text: str, marker: str = IMAGE_MARKER) -> list[dict]:
    """A turn's content parts: text, and an image part where each `marker` is (`<image>` in a user turn,
    `<output_image>` where a helper image goes in an assistant turn)."""
    content: list[dict] = []
    for i, piece in enumerate(text.split(marker)):
        if i:
            content.append({"type": "image", "text": None})
        if piece:
            content.append({"type": "text", "text": piece})
    return content


def user_content(text: str) -> list[dict]:
    """A user turn's content parts: text, and an image part where each `<image>` marker is."""
    return content_parts(text, IMAGE_MARKER)


def parse_row(
    obj,
    path,
    line: int,
    root: str | os.PathLike | None = None,
    benchmark: str | None = None,
    check_images: bool = True,
    fields: dict[str, str] | None = None,
) -> dict:
    """Validate one decoded JSONL object and turn it into the row schema (see module docstring).

    `line` is None for a row of a dataset (`path` then names the row); `fields` renames fields in the
    errors (a conversational row's `text_input` is its user turn)."""
    fields = fields or {}

    def loc(field):
        if field is not None:
            head, _, rest = field.partition("[")
            field = fields.get(head, head) + (f"[{rest}" if rest else "")
        return where(path, line, field)

    # 1. The texts and the image paths, their markers counted against the paths.
    text_input, text_output = _texts(obj, loc)
    inputs = _paths(obj, "image_input", loc)
    helpers = _paths(obj, "image_output", loc)
    _check_markers(text_input, text_output, inputs, helpers, loc)
    # 2. The images, resolved against the dataset root (and checked on disk).
    images = [
        _resolve_image(obj, "image_input", i, p, path, root, check_images, loc) for i, p in enumerate(inputs)
    ]
    helper_images = [
        _resolve_image(obj, "image_output", i, p, path, root, check_images, loc)
        for i, p in enumerate(helpers)
    ]
    helper_texts = _helper_texts(obj, len(helpers), loc)
    # 3. What grading needs: the benchmark, the map, the answer, the level.
    grid = _parse_map(obj["map_desc"], loc) if obj.get("map_desc") is not None else None
    if benchmark is None:
        benchmark = _infer_benchmark(text_input, grid is not None, loc)
    if benchmark in GRID_BENCHMARKS and grid is None and not text_output:
        raise MirageError(f"{loc('map_desc')}: {benchmark} test rows need map_desc (the grid) for grading")
    answer, map_id, level = _grading_fields(obj, text_output, grid, benchmark, inputs, loc)

    messages = [{"role": "user", "content": user_content(text_input)}]
    if text_output is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": text_output}]})
    return {
        "messages": messages,
        "images": images,
        "helper_images": helper_images,
        "helper_texts": helper_texts,
        "prompt_text": text_input,
        "completion_text": text_output or "",
        "benchmark": benchmark,
        "answer": answer,
        "map_desc": json.dumps(grid) if grid is not None else "",
        "map_id": map_id,
        "level": level,
        "source": where(path, line),
    }


def _texts(obj, loc) -> tuple[str, str | None]:
    """(text_input, text_output or None) of a row, both checked."""
    if not isinstance(obj, dict):
        raise MirageError(f"{loc(None)}: expected a JSON object, got {type(obj).__name__}")
    for field in ("text_input", "image_input"):
        if obj.get(field) is None:
            raise MirageError(f"{loc(field)}: missing required field")
    text_input = obj["text_input"]
    if not isinstance(text_input, str):
        raise MirageError(f"{loc('text_input')}: expected a string, got {type(text_input).__name__}")
    text_output = obj.get("text_output")
    if text_output is not None and not isinstance(text_output, str):
        raise MirageError(f"{loc('text_output')}: expected a string, got {type(text_output).__name__}")
    check_text(text_input, loc("text_input"))
    if text_output is not None:
        check_text(text_output, loc("text_output"))
    return text_input, text_output


def _check_markers(text_input: str, text_output: str | None, inputs: list, helpers: list, loc) -> None:
    """One input image per `<image>`, one helper image per `<output_image>`."""
    n_markers = text_input.count(IMAGE_MARKER)
    if n_markers != len(inputs):
        raise MirageError(
            f"{loc('image_input')}: {n_markers} <image> marker(s) in text_input but {len(inputs)} input image(s)"
        )
    n_out = (text_output or "").count(OUTPUT_IMAGE_MARKER)
    if n_out != len(helpers):
        raise MirageError(
            f"{loc('image_output')}: {n_out} <output_image> marker(s) in text_output but {len(helpers)} helper image(s)"
        )


def _resolve_image(obj, field: str, i: int, p: str, path, root, check_images: bool, loc) -> str:
    """The absolute path of image `i` of `field` (relative paths against `root` or the reference layout)."""
    base = Path(root) if root is not None else _default_root(Path(path), p)
    full = Path(p) if os.path.isabs(p) else (base / p)
    full = Path(os.path.normpath(full.absolute()))
    name = field if isinstance(obj[field], str) else f"{field}[{i}]"
    if any(len(os.fsencode(part)) > 255 for part in full.parts):
        raise MirageError(f"{loc(name)}: a name in the image path is longer than the file system allows")
    check_unicode(p, loc(name))
    if check_images:
        if not full.is_file():
            raise MirageError(f"{loc(name)}: image not found: {full}")
        check_image_header(full, loc(name))
    return str(full)


def _grading_fields(obj, text_output, grid, benchmark: str, inputs: list, loc) -> tuple[str, str, int]:
    """(answer, map_id, level) of a row: given, or the boxed answer of its output and the grid's side."""
    answer = obj.get("answer")
    if answer is None:
        answer = extract_boxed(text_output or "") or ""
    elif not isinstance(answer, (str, int)) or isinstance(answer, bool):
        raise MirageError(f"{loc('answer')}: expected a string, got {type(answer).__name__}")
    map_id = obj.get("map_id", "")
    if not isinstance(map_id, (str, int)) or isinstance(map_id, bool):
        raise MirageError(f"{loc('map_id')}: expected a string or integer, got {type(map_id).__name__}")
    level = obj.get("level")
    if level is not None and (type(level) is not int or level < 0):
        raise MirageError(f"{loc('level')}: expected a non-negative integer, got {_short(level)}")
    if grid is not None:
        level = len(grid)
    elif level is None:
        # VSP training rows carry no grid; the reference image folders are named level_<n>.
        m = _LEVEL_IN_PATH.search(inputs[0]) if benchmark.startswith("vsp") and inputs else None
        level = int(m.group(1)) if m else 0
    return str(answer).strip(), str(map_id), level


def load_rows(
    path: str | os.PathLike,
    root: str | os.PathLike | None = None,
    benchmark: str | None = None,
    check_images: bool = True,
) -> list[dict]:
    """Read a reference JSONL file into a list of row dicts (schema in the module docstring)."""
    if benchmark is not None:
        check_benchmark(benchmark)
    if root is not None and not Path(root).is_dir():
        raise MirageError(f"root: folder not found: {root}")
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise MirageError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise MirageError(f"{path}: is a folder, expected a JSONL file") from None
    except OSError as e:  # e.g. a name longer than the file system allows
        raise MirageError(f"{str(path)[:80]}: cannot open it ({e.strerror})") from None
    rows = []
    with f:
        for line_no, raw in enumerate(f, start=1):
            line = _decode_line(raw, path, line_no)
            if not line.strip():
                continue
            try:
                obj = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                raise MirageError(
                    f"{where(path, line_no)}: malformed JSON ({e.msg} at column {e.colno})"
                ) from None
            rows.append(parse_row(obj, path, line_no, root, benchmark, check_images))
    if not rows:
        raise MirageError(f"{path}: no rows (the file is empty)")
    return rows


def _decode_line(raw: bytes, path, line_no: int) -> str:
    """One line of a JSONL file as text: UTF-8 (a BOM on the first line is fine), or one line naming the problem."""
    if line_no == 1 and raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise MirageError(f"{where(path, 1)}: the file is UTF-16 text; save it as UTF-8")
    if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MirageError(
            f"{where(path, line_no)}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
            "save the file as UTF-8"
        ) from None


def load_reference_jsonl(
    path: str | os.PathLike,
    root: str | os.PathLike | None = None,
    benchmark: str | None = None,
    check_images: bool = True,
):
    """Load a reference-format JSONL file as a `datasets.Dataset` in the mirage-trl row schema.

    `root`: folder the image paths are relative to (default: the reference layout, see
    `_default_root`). `benchmark`: one of `BENCHMARKS`; None infers VSP rows from the prompt.
    Images are checked for existence only (`check_images`), decoded later by the collator.
    """
    from datasets import Dataset

    return Dataset.from_list(load_rows(path, root, benchmark, check_images), features=_features())


def require_helper_images(dataset, stage: int) -> None:
    """Raise naming the first row without helper images when `stage` needs them (stage 1)."""
    if stage not in STAGES:
        raise MirageError(f"unknown stage {stage!r}; valid: {', '.join(map(str, STAGES))}")
    if stage != STAGE1:  # stage 1 supervises latents with helper-image features; later stages feed their own
        return
    # A Dataset: read one Arrow column instead of decoding every row; a list of row dicts works too.
    helpers = [r["helper_images"] for r in dataset] if isinstance(dataset, list) else dataset["helper_images"]
    for i, paths in enumerate(helpers):
        if not paths:
            source = dataset[i]["source"]
            raise MirageError(
                f"{source}: stage {stage} needs helper images (<output_image> markers with image_output), "
                "this row has none"
            )


def strip_latent_markers(row: dict) -> dict:
    """Text-only baseline: the same row without `<output_image>` markers and helper images."""
    messages = []
    for msg in row["messages"]:
        if msg["role"] == "assistant":
            content = [{**c, "text": _strip(c["text"])} if c["type"] == "text" else c for c in msg["content"]]
            msg = {**msg, "content": content}
        messages.append(msg)
    return {
        **row,
        "messages": messages,
        "helper_images": [],
        "helper_texts": [],
        "completion_text": _strip(row["completion_text"]),
    }


def _strip(text: str) -> str:
    return text.replace(OUTPUT_IMAGE_MARKER, "").strip()


def helper_as_input(row: dict) -> dict:
    """Upper bound: helper images given as real input images (appended to the user turn), markers removed."""
    helpers = list(row["helper_images"])
    row = strip_latent_markers(row)
    messages = []
    for msg in row["messages"]:
        if msg["role"] == "user":
            msg = {**msg, "content": [*msg["content"], *({"type": "image", "text": None} for _ in helpers)]}
        messages.append(msg)
    return {
        **row,
        "messages": messages,
        "images": [*row["images"], *helpers],
        "prompt_text": row["prompt_text"] + IMAGE_MARKER * len(helpers),
    }
