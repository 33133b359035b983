"""Reference JSONL loader, user-data loaders and image loading: schema on the shared rows, one-line errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from mirage_trl.data.images import load_image
from mirage_trl.data.reference import (
    helper_as_input,
    load_reference_jsonl,
    load_rows,
    require_helper_images,
    strip_latent_markers,
)
from mirage_trl.errors import MirageError

PROMPT = "Look: <image> and answer."
VALID_KEYS = {
    "messages",
    "images",
    "helper_images",
    "helper_texts",
    "prompt_text",
    "completion_text",
    "benchmark",
    "answer",
    "map_desc",
    "map_id",
    "level",
    "source",
}


def _check_messages(row):
    user = row["messages"][0]
    assert user["role"] == "user"
    n_image_entries = sum(c["type"] == "image" for c in user["content"])
    assert n_image_entries == row["prompt_text"].count("<image>") == len(row["images"])
    # The text entries joined with the markers give back the prompt, in order.
    rebuilt = "".join("<image>" if c["type"] == "image" else c["text"] for c in user["content"])
    assert rebuilt == row["prompt_text"]


def test_sample_rows_load(official_data):
    path = official_data / "examples" / "sample.jsonl"
    ds = load_reference_jsonl(path)
    raw = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    assert len(ds) == 10 == len(raw)
    assert set(ds.column_names) == VALID_KEYS
    for i, (row, src) in enumerate(zip(ds, raw)):
        assert row["benchmark"] == "vsp_reasoning"
        # resolved on both sides: ../shared may be a symbolic link (CI links or copies it)
        assert [Path(p).resolve() for p in row["images"]] == [
            (official_data.parent / src["image_input"]).resolve()
        ]
        assert [Path(p).resolve() for p in row["helper_images"]] == [
            (official_data.parent / src["image_output"]).resolve()
        ]
        assert all(Path(p).is_file() for p in row["images"] + row["helper_images"])
        _check_messages(row)
        assert row["messages"][1] == {
            "role": "assistant",
            "content": [{"type": "text", "text": src["text_output"]}],
        }
        assert row["completion_text"].count("<output_image>") == len(row["helper_images"]) == 1
        assert row["answer"] in ("A", "B", "C")
        assert row["level"] == int(src["image_input"].split("level_")[1].split("/")[0])
        assert row["map_desc"] == ""
        assert row["source"] == f"{path}:{i + 1}"
    assert ds[0]["answer"] == "A"


def test_vsp_planning_test_rows_load(official_data):
    path = official_data / "vsp_spatial_planning" / "test_direct.jsonl"
    ds = load_reference_jsonl(path)
    assert len(ds) == 400
    assert set(ds["benchmark"]) == {"vsp_planning"}
    assert sorted(set(ds["level"])) == [3, 4, 5, 6]
    assert all(ds["level"].count(n) == 100 for n in (3, 4, 5, 6))
    for row in ds:
        assert len(row["images"]) == 1 and Path(row["images"][0]).is_file()
        assert row["helper_images"] == []
        assert len(row["messages"]) == 1  # test rows have no assistant turn
        assert row["completion_text"] == "" and row["answer"] == ""
        _check_messages(row)
        grid = json.loads(row["map_desc"])
        assert len(grid) == row["level"]
        assert f"level{row['level']}/img/{row['map_id']}.png" in row["images"][0]
    first = ds[0]
    assert first["map_desc"] == "[[2, -1, 1], [0, 0, 0], [0, 0, 0]]"
    assert [c["type"] for c in first["messages"][0]["content"]] == ["text", "image", "text"]


def _write(tmp_path, rows, name="d.jsonl", images=("a.png", "b.png", "h.png")):
    for im in images:
        Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / im)
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GOOD = {
    "text_input": PROMPT,
    "image_input": "a.png",
    "text_output": "x <output_image> \\boxed{B}",
    "image_output": "h.png",
}


def _error(path, **kw) -> str:
    with pytest.raises(MirageError) as e:
        load_reference_jsonl(path, **kw)
    return str(e.value)


def test_own_folder_root_schema_and_blank_lines(tmp_path):
    path = _write(
        tmp_path,
        [GOOD, "", {**GOOD, "answer": "(C)", "level": 2, "map_id": 7}],
    )
    ds = load_reference_jsonl(path, benchmark="jigsaw")
    assert len(ds) == 2
    row = ds[0]
    assert row["images"] == [str(tmp_path / "a.png")] and row["helper_images"] == [str(tmp_path / "h.png")]
    assert row["messages"][0]["content"] == [
        {"type": "text", "text": "Look: "},
        {"type": "image", "text": None},
        {"type": "text", "text": " and answer."},
    ]
    assert (row["answer"], row["level"], row["map_id"], row["source"]) == ("B", 0, "", f"{path}:1")
    assert (ds[1]["answer"], ds[1]["level"], ds[1]["map_id"], ds[1]["source"]) == ("(C)", 2, "7", f"{path}:3")


def test_errors_name_file_line_field(tmp_path):
    p = _write(tmp_path, [GOOD, '{"text_input": "a", '])
    assert (
        _error(p, benchmark="sat")
        == f"{p}:2: malformed JSON (Expecting property name enclosed in double quotes at column 21)"
    )
    p = _write(tmp_path, [GOOD, "[1, 2]"])
    assert _error(p, benchmark="sat") == f"{p}:2: expected a JSON object, got list"
    p = _write(tmp_path, [{"image_input": "a.png"}])
    assert _error(p, benchmark="sat") == f"{p}:1:text_input: missing required field"
    p = _write(tmp_path, [{"text_input": "t"}])
    assert _error(p, benchmark="sat") == f"{p}:1:image_input: missing required field"
    p = _write(tmp_path, [{**GOOD, "text_input": 3}])
    assert _error(p, benchmark="sat") == f"{p}:1:text_input: expected a string, got int"
    p = _write(tmp_path, [{**GOOD, "image_input": {"x": 1}}])
    assert (
        _error(p, benchmark="sat") == f'{p}:1:image_input: expected a path or a list of paths, got {{"x": 1}}'
    )
    p = _write(tmp_path, [{**GOOD, "level": "3"}])
    assert _error(p, benchmark="sat") == f'{p}:1:level: expected a non-negative integer, got "3"'
    p = _write(tmp_path, [{**GOOD, "map_desc": [[1, 0], [0, 5]]}])
    assert (
        _error(p, benchmark="vsp_planning")
        == f"{p}:1:map_desc: expected a grid of -1/0/1/2 (list of lists), got [[1, 0], [0, 5]]"
    )


def test_empty_file_and_missing_file(tmp_path):
    p = _write(tmp_path, ["", "  "])
    assert _error(p) == f"{p}: no rows (the file is empty)"
    assert _error(tmp_path / "nope.jsonl") == f"{tmp_path / 'nope.jsonl'}: file not found"


def test_missing_image(tmp_path):
    p = _write(
        tmp_path, [GOOD, {**GOOD, "image_input": ["a.png", "gone.png"], "text_input": "<image><image>"}]
    )
    assert _error(p, benchmark="sat") == f"{p}:2:image_input[1]: image not found: {tmp_path / 'gone.png'}"
    p = _write(tmp_path, [{**GOOD, "image_output": "gone.png"}])
    assert _error(p, benchmark="sat") == f"{p}:1:image_output: image not found: {tmp_path / 'gone.png'}"
    # check_images=False defers the check to whoever decodes the image.
    assert load_reference_jsonl(p, benchmark="sat", check_images=False)[0]["helper_images"] == [
        str(tmp_path / "gone.png")
    ]


def test_marker_count_mismatch(tmp_path):
    p = _write(tmp_path, [{**GOOD, "image_input": ["a.png", "b.png"]}])
    assert (
        _error(p, benchmark="sat")
        == f"{p}:1:image_input: 1 <image> marker(s) in text_input but 2 input image(s)"
    )
    p = _write(tmp_path, [{**GOOD, "text_output": "<output_image> <output_image> \\boxed{A}"}])
    assert (
        _error(p, benchmark="sat")
        == f"{p}:1:image_output: 2 <output_image> marker(s) in text_output but 1 helper image(s)"
    )
    p = _write(tmp_path, [{**GOOD, "text_output": "\\boxed{A}"}])
    assert (
        _error(p, benchmark="sat")
        == f"{p}:1:image_output: 0 <output_image> marker(s) in text_output but 1 helper image(s)"
    )


def test_benchmark_errors(tmp_path):
    p = _write(tmp_path, [GOOD])
    assert (
        _error(p, benchmark="blink")
        == "unknown benchmark 'blink'; valid: vsp_planning, vsp_reasoning, vsp_grounding, jigsaw, sat, comt"
    )
    assert _error(p) == (
        f"{p}:1: cannot tell the benchmark of this row; pass benchmark= "
        "(one of vsp_planning, vsp_reasoning, vsp_grounding, jigsaw, sat, comt)"
    )


def test_reference_layout_root(tmp_path):
    # A JSONL deep inside <root>/data/... with ./data/ paths resolves against <root>.
    (tmp_path / "data" / "task" / "imgs").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "data" / "task" / "imgs" / "m.png")
    row = {
        "text_input": "action plan: <image>",
        "image_input": "./data/task/imgs/m.png",
        "map_desc": [[1, 2]],
    }
    path = tmp_path / "data" / "task" / "t.jsonl"
    path.write_text(json.dumps(row) + "\n")
    (r,) = load_rows(path)
    assert (r["images"], r["benchmark"], r["level"]) == (
        [str(tmp_path / "data/task/imgs/m.png")],
        "vsp_planning",
        1,
    )
    # An explicit root wins.
    (r,) = load_rows(path, root=tmp_path / "data" / "task", check_images=False)
    assert r["images"] == [str(tmp_path / "data/task/data/task/imgs/m.png")]


def test_strip_markers_and_helper_as_input(tmp_path):
    ds = load_reference_jsonl(_write(tmp_path, [GOOD]), benchmark="jigsaw")
    text_only = strip_latent_markers(ds[0])
    assert text_only["completion_text"] == "x  \\boxed{B}"
    assert text_only["messages"][1]["content"] == [{"type": "text", "text": "x  \\boxed{B}"}]
    assert text_only["helper_images"] == [] and text_only["images"] == ds[0]["images"]
    upper = helper_as_input(ds[0])
    assert upper["images"] == [str(tmp_path / "a.png"), str(tmp_path / "h.png")]
    assert [c["type"] for c in upper["messages"][0]["content"]] == ["text", "image", "text", "image"]
    assert upper["prompt_text"] == PROMPT + "<image>"
    assert upper["helper_images"] == [] and "<output_image>" not in upper["messages"][1]["content"][0]["text"]
    # Works through datasets.map too (the baseline recipes use it).
    mapped = ds.map(helper_as_input)
    assert mapped[0]["images"] == upper["images"]


def test_user_benchmarks_and_helper_requirement(tmp_path):
    no_helper = {"text_input": PROMPT, "image_input": "a.png", "text_output": "\\boxed{A}"}
    p = _write(tmp_path, [GOOD, no_helper])
    sat, comt = load_reference_jsonl(p, benchmark="sat"), load_reference_jsonl(p, benchmark="comt")
    assert set(sat["benchmark"]) == {"sat"} and set(comt["benchmark"]) == {"comt"}
    assert sat["answer"] == ["B", "A"]
    with pytest.raises(MirageError) as e:
        require_helper_images(sat, stage=1)
    assert str(e.value) == (
        f"{p}:2: stage 1 needs helper images (<output_image> markers with image_output), this row has none"
    )
    assert require_helper_images(sat, stage=2) is None
    assert require_helper_images(sat.select([0]), stage=1) is None
    with pytest.raises(MirageError, match=r"^unknown stage 4; valid: 1, 2, 3$"):
        require_helper_images(sat, stage=4)


def test_load_image_errors(tmp_path):
    good = tmp_path / "good.png"
    Image.new("RGBA", (40, 30), (1, 2, 3, 4)).save(good)
    im = load_image(good)
    assert (im.mode, im.size, im.getpixel((0, 0))) == ("RGB", (40, 30), (1, 2, 3))

    noise = Image.frombytes("RGB", (64, 64), os.urandom(64 * 64 * 3))
    noise.save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    truncated = tmp_path / "trunc.png"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(MirageError) as e:
        load_image(truncated, source="d.jsonl:12:image_input")
    assert str(e.value).startswith(f"d.jsonl:12:image_input: broken or truncated image {truncated} (")

    with pytest.raises(MirageError) as e:
        load_image(tmp_path / "missing.png")
    assert str(e.value) == f"image not found: {tmp_path / 'missing.png'}"
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(MirageError) as e:
        load_image(tmp_path / "text.png", source="x:1")
    assert str(e.value) == f"x:1: not a readable image: {tmp_path / 'text.png'}"


def test_helper_texts_are_read_and_checked(tmp_path):
    """`image_output_text`: what each helper image shows (latent_aux_text's target), one per helper image."""
    p = _write(tmp_path, [{**GOOD, "image_output_text": "(0,0) (0,1)"}, GOOD])
    ds = load_reference_jsonl(p, benchmark="sat")
    assert ds[0]["helper_texts"] == ["(0,0) (0,1)"] and ds[1]["helper_texts"] == []
    p = _write(tmp_path, [{**GOOD, "image_output_text": ["a", "b"]}])
    assert (
        _error(p, benchmark="sat")
        == f"{p}:1:image_output_text: 2 text(s) for 1 helper image(s) (image_output)"
    )
    p = _write(tmp_path, [{**GOOD, "image_output_text": 3}])
    assert _error(p, benchmark="sat") == f"{p}:1:image_output_text: expected a text or a list of texts, got 3"
    p = _write(tmp_path, [{**GOOD, "image_output_text": "<|latent_pad|>"}])
    assert _error(p, benchmark="sat").startswith(f"{p}:1:image_output_text[0]: contains the reserved token")
