"""Datasets that travel: generated rows as a Hub dataset folder, images inside, with its card.

`write_hub_dataset` turns a reference-format JSONL (what `mirage-trl data vsp|jigsaw` writes) into the layout the
Hub serves: `data/<split>-00000-of-00001.parquet` with `datasets.Image` columns (the PNG bytes embedded, no path
left to break) and a `README.md` dataset card (the `configs` that map the split to its file, the generator's
settings and seed, how to load it). Rows are in TRL's conversational vision schema, which every TRL trainer and
`mirage-trl` read:

- `messages`: the user turn (text parts and one `{"type": "image"}` part per input image) and, for training
  rows, the assistant turn with one `{"type": "image"}` part where each helper image (latent span) goes;
- `images`, `helper_images`: the input and helper images; `helper_texts`: what each helper image shows;
- `benchmark`, `answer`, `map_desc`, `level`, `map_id`: what grading needs.

The folder loads back with `datasets.load_dataset(folder)`, `--dataset_name folder` or `mirage-trl eval --data
folder`, and goes to the Hub as it is (`hub.push_folder`, repo type dataset).
"""

from __future__ import annotations

import json
from pathlib import Path

from .reference import OUTPUT_IMAGE_MARKER, load_reference_jsonl

DATA_FOLDER = "data"


def _features():
    from datasets import Features, Image, List, Value

    part = {"type": Value("string"), "text": Value("string")}
    return Features(
        {
            "messages": List({"role": Value("string"), "content": List(part)}),
            "images": List(Image()),
            "helper_images": List(Image()),
            "helper_texts": List(Value("string")),
            "benchmark": Value("string"),
            "answer": Value("string"),
            "map_desc": Value("string"),
            "level": Value("int64"),
            "map_id": Value("string"),
        }
    )


def _assistant(text: str) -> list[dict]:
    """The assistant turn's parts: text, and an image part where each `<output_image>` marker was."""
    parts = []
    for i, piece in enumerate(text.split(OUTPUT_IMAGE_MARKER)):
        if i:
            parts.append({"type": "image", "text": None})
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


def _image(path: str) -> dict:
    return {"bytes": Path(path).read_bytes(), "path": Path(path).name}


def hub_rows(jsonl: str | Path, benchmark: str | None = None) -> list[dict]:
    """The rows of a reference JSONL in the conversational schema above, images read into bytes."""
    rows = []
    for row in load_reference_jsonl(jsonl, benchmark=benchmark):
        user = [{"type": p["type"], "text": p.get("text")} for p in row["messages"][0]["content"]]
        messages = [{"role": "user", "content": user}]
        if row["completion_text"]:
            messages.append({"role": "assistant", "content": _assistant(row["completion_text"])})
        rows.append(
            {
                "messages": messages,
                "images": [_image(p) for p in row["images"]],
                "helper_images": [_image(p) for p in row["helper_images"]],
                "helper_texts": list(row["helper_texts"]),
                "benchmark": row["benchmark"],
                "answer": row["answer"],
                "map_desc": row["map_desc"],
                "level": row["level"],
                "map_id": row["map_id"],
            }
        )
    return rows


def write_hub_dataset(
    jsonl: str | Path,
    folder: str | Path,
    split: str,
    title: str,
    settings: dict,
    command: str,
    benchmark: str | None = None,
) -> Path:
    """Write `folder/data/<split>-00000-of-00001.parquet` and `folder/README.md` (see the module doc)."""
    from datasets import Dataset

    folder = Path(folder)
    rows = hub_rows(jsonl, benchmark)
    data = folder / DATA_FOLDER / f"{split}-00000-of-00001.parquet"
    data.parent.mkdir(parents=True, exist_ok=True)
    Dataset.from_list(rows, features=_features()).to_parquet(str(data))
    (folder / "README.md").write_text(
        dataset_card(title, split, len(rows), settings, command), encoding="utf-8"
    )
    return folder


def dataset_card(title: str, split: str, num_rows: int, settings: dict, command: str) -> str:
    """The dataset card: the Hub's metadata (configs, size, task, tags) and what made the rows."""
    from huggingface_hub import DatasetCard, DatasetCardData

    size = "n<1K" if num_rows < 1000 else "1K<n<10K" if num_rows < 10_000 else "10K<n<100K"
    data = DatasetCardData(
        pretty_name=title,
        task_categories=["image-text-to-text"],
        tags=["mirage-trl", "latent-visual-reasoning", "synthetic"],
        size_categories=[size],
        configs=[
            {"config_name": "default", "data_files": [{"split": split, "path": f"{DATA_FOLDER}/{split}-*"}]}
        ],
    )
    table = "\n".join(f"| `{k}` | `{json.dumps(v)}` |" for k, v in settings.items())
    text = f"""---
{data.to_yaml()}
---

# {title}

{num_rows} rows (split `{split}`) generated by mirage-trl (`pip install mirage-trl`) with

```bash
{command}
```

The same command and seed write the same rows, byte for byte.

| setting | value |
|---|---|
{table}

## Schema

TRL's conversational vision schema: `messages` (the user turn with one `{{"type": "image"}}` part per input
image; for training rows, the assistant turn with one `{{"type": "image"}}` part per helper image, where Mirage
puts a span of latent tokens), `images` and `helper_images` (embedded PNG), `helper_texts` (what each helper
image shows), and what grading needs: `benchmark`, `answer`, `map_desc`, `level`, `map_id`.

## Use

```python
from datasets import load_dataset

rows = load_dataset("REPO_OR_FOLDER", split="{split}")
```

```bash
mirage-trl eval --model MODEL --data REPO_OR_FOLDER --data-split {split}
accelerate launch recipes/stage1_vsp.py --config ... --dataset_name REPO_OR_FOLDER --dataset_train_split {split}
```
"""
    return str(DatasetCard(text))
