"""Text and images that cannot be trained on as they are: reserved tokens
written literally, other encodings, lone surrogates, over-long path names, images the processor cannot take.
Each gives one line naming file, line and field in the loader, `mirage-trl data check` (a subprocess) and the
collator, before any model work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mirage_trl.errors import MirageError

REPO = Path(__file__).resolve().parents[2]
RESERVED = [
    "<|latent_pad|>",
    "<|latent_start|>",
    "<|latent_end|>",
    "<|image_pad|>",
    "<|vision_start|>",
    "<|im_start|>",
    "<|endoftext|>",
]


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    from mirage_trl.data.vsp import generate_vsp

    root = tmp_path_factory.mktemp("input_safety")
    data = generate_vsp(
        "planning", [3], 2, split="train", style="cot", seed=0, out_dir=root / "d", progress=False
    )
    objs = [json.loads(line) for line in data.read_text().splitlines()]
    for o in objs:
        o["image_input"] = str((data.parent / o["image_input"]).resolve())
        o["image_output"] = str((data.parent / o["image_output"]).resolve())
    return objs


def _write(path, objs, raw=None):
    text = "".join(json.dumps(o) + "\n" for o in objs)
    path.write_bytes(raw if raw is not None else text.encode("utf-8"))
    return path


def _check_cli(path):
    p = subprocess.run(
        [sys.executable, "-m", "mirage_trl", "data", "check", "--data", str(path)],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        timeout=120,
    )
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    return lines[0]


def _both(path, pattern):
    from mirage_trl.data.reference import load_reference_jsonl

    with pytest.raises(MirageError, match=pattern):
        load_reference_jsonl(path)
    import re

    assert re.search(pattern, _check_cli(path))


@pytest.mark.parametrize("token", RESERVED)
@pytest.mark.parametrize("field", ["text_input", "text_output"])
def test_reserved_token_in_text_names_file_line_field(good, tmp_path, token, field):
    objs = [dict(o) for o in good]
    objs[1][field] = f"{token} " + objs[1][field]
    path = _write(tmp_path / "bad.jsonl", objs)
    _both(
        path,
        rf"bad\.jsonl:2:{field}: contains the reserved token '{__import__('re').escape(token)}' literally",
    )


def test_reserved_token_in_a_hand_built_row_reaches_the_collator_as_one_line(good, tmp_path):
    from mirage_trl.data.reference import load_rows
    from mirage_trl.latent.collator import MirageDataCollator
    from mirage_trl.models.prepare import add_latent_tokens
    from mirage_trl.models.tiny import build_tiny_model

    model, processor = build_tiny_model(seed=0)
    tokens = add_latent_tokens(processor, model, latent_size=2)
    row = load_rows(_write(tmp_path / "ok.jsonl", good))[0]
    row["messages"][1]["content"][0]["text"] += " <|latent_pad|> \\boxed{L}"
    with pytest.raises(
        MirageError,
        match=r"ok\.jsonl:1:messages\[assistant\]: contains the reserved token '<\|latent_pad\|>'",
    ):
        MirageDataCollator(processor, tokens)([row])


def test_utf16_file_names_the_encoding(good, tmp_path):
    text = "".join(json.dumps(o) + "\n" for o in good)
    path = _write(tmp_path / "bad.jsonl", good, raw=text.encode("utf-16"))
    _both(path, r"bad\.jsonl:1: the file is UTF-16 text; save it as UTF-8")


def test_latin1_line_names_line_and_column(good, tmp_path):
    objs = [dict(o) for o in good]
    objs[1]["text_input"] = objs[1]["text_input"] + " café"
    text = "".join(json.dumps(o, ensure_ascii=False) + "\n" for o in objs)
    path = _write(tmp_path / "bad.jsonl", objs, raw=text.encode("latin-1"))
    _both(path, r"bad\.jsonl:2: not UTF-8 text \(byte 0xe9 at column \d+\); save the file as UTF-8")


def test_lone_surrogate_names_the_field(good, tmp_path):
    objs = [dict(o) for o in good]
    lines = [json.dumps(o) for o in objs]
    lines[1] = lines[1].replace('"text_output": "', '"text_output": "\\ud800', 1)
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    _both(path, r"bad\.jsonl:2:text_output: invalid Unicode \(a lone surrogate at column 1\)")


def test_over_long_path_component_names_the_row(good, tmp_path):
    objs = [dict(o) for o in good]
    objs[0]["image_input"] = str(tmp_path / ("y" * 300 + ".png"))
    path = _write(tmp_path / "bad.jsonl", objs)
    _both(path, r"bad\.jsonl:1:image_input: a name in the image path is longer than the file system allows")


def _image(path: Path, size) -> str:
    from PIL import Image

    Image.new("RGB", size, "white").save(path)
    return str(path)


@pytest.mark.parametrize(
    "case, size, pattern",
    [
        ("elongated", (4020, 20), r"is 4020x20: aspect ratio above 200"),
        ("too_many_pixels", (9000, 8000), r"has 9000x8000 pixels, more than the \d+ mirage-trl takes"),
    ],
)
@pytest.mark.parametrize("field", ["image_input", "image_output"])
def test_images_the_processor_cannot_take(good, tmp_path, case, size, pattern, field):
    objs = [dict(o) for o in good]
    objs[1][field] = _image(tmp_path / f"{case}.png", size)
    path = _write(tmp_path / "bad.jsonl", objs)
    _both(path, rf"bad\.jsonl:2:{field}: image \S+{case}\.png {pattern}")


def test_decompression_bomb_is_refused_from_its_header(good, tmp_path):
    """A PNG whose header claims 40000x40000 (a compressed bomb): refused without decoding."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 40000, 40000, 8, 0, 0, 0, 0)
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )
    objs = [dict(o) for o in good]
    objs[0]["image_input"] = str(bomb)
    path = _write(tmp_path / "bad.jsonl", objs)
    _both(path, r"bad\.jsonl:1:image_input: (refused a decompression bomb|image \S+ has 40000x40000 pixels)")
