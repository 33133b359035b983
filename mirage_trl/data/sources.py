"""Where rows come from: a reference-format JSONL file, a local dataset folder, or a Hub dataset by name.

`load_data` is what `--dataset_name` (training) and `--data` (`mirage-trl eval`) go through:

- a reference-format JSONL file: read line by line, every error names `file:line:field`;
- a local folder saved with `Dataset.save_to_disk` / `DatasetDict.save_to_disk`, or holding data files
  (parquet, JSONL, ...) that `datasets.load_dataset` reads, image paths relative to that folder;
- any other `org/name` through `datasets.load_dataset(name, config, split=...)` (the Hub where one is
  reachable, or a dataset script's cache).

Two row schemas, told apart per row:

- the reference one (`text_input`, `image_input`, `text_output`, `image_output`, ...);
- TRL's conversational vision schema: `messages` (an optional system turn, a user turn whose content
  holds typed `{"type": "image"}` / `{"type": "text"}` parts, and for training rows an assistant turn) and
  an `images` column; the helper images of the latent spans are a `helper_images` column of their own,
  one per `<output_image>` marker or `{"type": "image"}` part of the assistant turn. Optional columns
  `benchmark`, `answer`, `map_desc`, `level`, `map_id` are read as in the reference schema.

Images may be paths, bytes (`datasets.Image` columns) or PIL images; those that are not files already are
written once, named by their content's hash, under the datasets cache, so the collator decodes files as
for JSONL data. Every row is converted into the one row schema of `data.reference` and checked there.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from pathlib import Path

from ..errors import MirageError, where
from ..io import looks_like_hub_name
from .reference import OUTPUT_IMAGE_MARKER, _features, load_reference_jsonl, parse_row

logger = logging.getLogger(__name__)

# Where a conversational row's parts land in the reference schema, so that parse_row's errors name the
# column the user wrote.
_CONVERSATIONAL_FIELDS = {
    "text_input": "messages[user]",
    "text_output": "messages[assistant]",
    "image_input": "images",
    "image_output": "helper_images",
    "image_output_text": "helper_texts",
}
_OPTIONAL_COLUMNS = ("answer", "map_desc", "level", "map_id")
_SAVED_DATASET_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")


def load_data(
    name: str,
    split: str = "train",
    config: str | None = None,
    root: str | os.PathLike | None = None,
    benchmark: str | None = None,
    streaming: bool = False,
    flag: str = "--dataset_name",
):
    """Rows of `name` (a file, a folder or a dataset id; see the module docstring) as a `datasets.Dataset`
    in mirage-trl's row schema. `split` and `config` apply to folders and dataset ids; `flag` is the option
    the user gave `name` with, for the error messages."""
    if streaming:
        raise MirageError(
            f"{flag} {name}: streaming is not supported (every row is checked before training starts); "
            "drop --dataset_streaming and take a part with a split slice such as --dataset_train_split 'train[:1000]'"
        )
    path = Path(name)
    if path.is_file() and _is_reference_jsonl(path):
        return load_reference_jsonl(path, root=root, benchmark=benchmark)
    if path.is_file():
        dataset = _load(flag, name, lambda load: load(_builder(path), data_files=str(path), split="train"))
        return _convert(dataset, str(path), root or path.resolve().parent, benchmark)
    if path.is_dir():
        dataset = _load_folder(path, split, config, flag)
        return _convert(dataset, f"{path}[{split}]", root or path.resolve(), benchmark)

    if not looks_like_hub_name(name):
        raise MirageError(f"{flag} {name}: no such file or folder")
    dataset = _load(flag, name, lambda load: load(name, config, split=split))
    return _convert(dataset, f"{name}[{split}]", root or Path.cwd(), benchmark)


def _is_reference_jsonl(path: Path) -> bool:
    """A `.jsonl` / `.json` file whose first object has `text_input` (read the reference way, by line)."""
    import json

    if path.suffix not in (".jsonl", ".json"):
        return False
    with open(path, "rb") as f:
        for raw in f:
            if raw.strip():
                try:
                    obj = json.loads(raw.decode("utf-8-sig", errors="replace"))
                except json.JSONDecodeError:
                    return True  # the reference reader names the line and the column
                return not (isinstance(obj, dict) and "messages" in obj)
    return True  # empty: the reference reader says so


def _builder(path: Path) -> str:
    kinds = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
    if path.suffix not in kinds:
        raise MirageError(f"{path}: unknown data file type (use .jsonl, .json, .parquet, .csv or .arrow)")
    return kinds[path.suffix]


def _load(flag: str, name: str, call):
    """`datasets.load_dataset` through `call`, its failure as one line naming the flag and the name."""
    from datasets import load_dataset

    try:
        return call(load_dataset)
    except MirageError:
        raise
    except Exception as e:  # datasets raises many kinds (not found, offline, bad split, bad config, bad file)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MirageError(f"{flag} {name}: cannot load it ({type(e).__name__}: {first[:200]})") from None


def _load_folder(path: Path, split: str, config: str | None, flag: str):
    if any((path / f).is_file() for f in _SAVED_DATASET_FILES):
        from datasets import DatasetDict, load_from_disk

        # in memory: nothing (no cache-*.arrow) is ever written into the user's dataset folder
        dataset = _load(flag, str(path), lambda _: load_from_disk(str(path), keep_in_memory=True))
        if isinstance(dataset, DatasetDict):
            if split not in dataset:
                raise MirageError(
                    f"{flag} {path}: no split {split!r} (splits: {', '.join(dataset)}); set the split flag"
                )
            return dataset[split]
        # One saved split: its own name must be the one asked for (an eval must not grade training rows).
        saved = str(dataset.split) if dataset.split is not None else None
        if saved is not None and saved != split:
            raise MirageError(f"{flag} {path}: no split {split!r} (splits: {saved}); set the split flag")
        if saved is None:
            logger.warning("%s %s: one split without a name, used as %r", flag, path, split)
        return dataset
    return _load(flag, str(path), lambda load: load(str(path), config, split=split))


def _convert(dataset, source: str, root, benchmark: str | None):
    """Every row of a loaded dataset in mirage-trl's row schema, checked by `parse_row`."""
    from datasets import Dataset

    if len(dataset) == 0:
        raise MirageError(f"{source}: no rows")
    dataset = _undecoded_images(dataset)
    cache = _image_cache()
    rows = []
    for i, row in enumerate(dataset):
        loc = f"{source}[{i}]"
        rows.append(_convert_row(row, loc, Path(root), benchmark, cache))
    return Dataset.from_list(rows, features=_features())


def _convert_row(row: dict, loc: str, root: Path, benchmark: str | None, cache: Path) -> dict:
    if "text_input" in row:
        obj = {
            **row,
            **{f: _image_paths(row.get(f), f"{loc}:{f}", cache) for f in ("image_input", "image_output")},
        }
        if "benchmark" in row and benchmark is None and row["benchmark"]:
            benchmark = row["benchmark"]
        return parse_row(obj, loc, None, root, benchmark)
    if "messages" not in row:
        raise MirageError(f"{loc}: neither a reference row (text_input) nor a conversational one (messages)")
    obj, system = _from_messages(row["messages"], loc)
    obj["image_input"] = _image_paths(row.get("images"), f"{loc}:images", cache)
    obj["image_output"] = _image_paths(row.get("helper_images"), f"{loc}:helper_images", cache)
    if row.get("helper_texts"):
        obj["image_output_text"] = row["helper_texts"]
    for column in _OPTIONAL_COLUMNS:
        if row.get(column) is not None and row.get(column) != "":
            obj[column] = row[column]
    parsed = parse_row(
        obj, loc, None, root, benchmark or row.get("benchmark") or None, fields=_CONVERSATIONAL_FIELDS
    )
    if system is not None:
        parsed["messages"] = [
            {"role": "system", "content": [{"type": "text", "text": system}]},
            *parsed["messages"],
        ]
    return parsed


def _from_messages(messages, loc: str) -> tuple[dict, str | None]:
    """A conversation ([system,] user[, assistant]) as reference `text_input` / `text_output` and the system text."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise MirageError(f"{loc}:messages: expected a list of {{role, content}} turns")
    roles = [m.get("role") for m in messages]
    system = None
    if roles[:1] == ["system"]:
        system = _text_of(messages[0], f"{loc}:messages[system]", image_marker=None)
        messages, roles = messages[1:], roles[1:]
    if roles not in (["user"], ["user", "assistant"]):
        raise MirageError(
            f"{loc}:messages: expected one user turn and at most one assistant turn after an optional system "
            f"turn, got roles {roles}"
        )
    obj = {"text_input": _text_of(messages[0], f"{loc}:messages[user]", image_marker="<image>")}
    if len(messages) == 2:
        obj["text_output"] = _text_of(
            messages[1], f"{loc}:messages[assistant]", image_marker=OUTPUT_IMAGE_MARKER
        )
    return obj, system


def _text_of(message: dict, loc: str, image_marker: str | None) -> str:
    """A turn's text with each image part written as `image_marker` (user: `<image>`, assistant: a latent span)."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise MirageError(f"{loc}: content must be a string or a list of typed parts")
    text = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            text.append(part["text"])
        elif kind == "image" and image_marker is not None:
            text.append(image_marker)
        else:
            allowed = "text and image" if image_marker else "text"
            raise MirageError(f"{loc}: part {j} is not a {allowed} part ({str(part)[:60]})")
    return "".join(text)


def _undecoded_images(dataset):
    """Image columns read as {bytes, path} instead of decoded PIL images (decoded once, later, by the collator)."""
    from datasets import Image

    features = dataset.features or {}
    for column, feature in features.items():
        inner = getattr(feature, "feature", None)
        if isinstance(feature, Image):
            dataset = dataset.cast_column(column, Image(decode=False))
        elif isinstance(inner, Image):
            dataset = dataset.cast_column(column, type(feature)(Image(decode=False)))
    return dataset


def _image_cache() -> Path:
    from datasets import config

    return Path(config.HF_DATASETS_CACHE) / "mirage_trl_images"


def _image_paths(value, loc: str, cache: Path):
    """Paths for one row's images: strings are kept (relative ones resolve against the dataset's folder in
    parse_row), bytes and PIL images become files named by their content's hash."""
    if value is None:
        return None
    if isinstance(value, (str, dict)) or hasattr(value, "save"):
        value = [value]
    if not isinstance(value, list):
        raise MirageError(f"{loc}: expected a list of images (paths, bytes or PIL images)")
    return [_image_path(v, f"{loc}[{i}]", cache) for i, v in enumerate(value)]


def _image_path(value, loc: str, cache: Path) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and (value.get("bytes") or value.get("path")):
        if value.get("bytes"):
            return _write_image(value["bytes"], loc, cache)
        return value["path"]
    if hasattr(value, "save"):  # a PIL image
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        return _write_image(buffer.getvalue(), loc, cache)
    raise MirageError(f"{loc}: not an image (a path, image bytes or a PIL image), got {type(value).__name__}")


def _write_image(data: bytes, loc: str, cache: Path) -> str:
    """The image's bytes as a file named by their hash; written once, atomically (never half a file)."""
    from PIL import Image, UnidentifiedImageError

    try:
        kind = (Image.open(io.BytesIO(data)).format or "png").lower()
    except (UnidentifiedImageError, OSError):
        raise MirageError(f"{where(loc)}: the bytes are not an image PIL can read") from None
    target = cache / f"{hashlib.sha256(data).hexdigest()[:32]}.{kind}"
    if not target.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, target)
    return str(target)
