"""Jigsaw generator and the `data jigsaw` / `data check` commands, on images drawn here."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from PIL import Image

from mirage_trl.cli import main
from mirage_trl.data.images import load_image
from mirage_trl.data.jigsaw import HOLE_COLOR, generate_jigsaw
from mirage_trl.data.reference import load_reference_jsonl
from mirage_trl.errors import MirageError


def _draw(folder: Path, n: int = 3, size=(96, 72)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(123)
    for i in range(n):
        im = Image.frombytes("RGB", size, rng.randbytes(size[0] * size[1] * 3))
        im.save(folder / (f"img{i}.png" if i % 2 == 0 else f"img{i}.PNG"))
    (folder / "notes.txt").write_text("not an image, ignored")
    return folder


def _same(a, b) -> bool:
    return a.size == b.size and a.tobytes() == b.tobytes()


def test_rows_answers_and_helper_images(tmp_path):
    src = _draw(tmp_path / "src")
    jsonl = generate_jigsaw(src, num_samples=8, seed=0, out=tmp_path / "out")
    assert jsonl == tmp_path / "out" / "jigsaw.jsonl"
    ds = load_reference_jsonl(jsonl, benchmark="jigsaw")
    raw = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert len(ds) == 8
    letters = []
    for row, r in zip(ds, raw):
        assert len(row["images"]) == 3 and len(row["helper_images"]) == 1
        assert row["completion_text"].endswith(f"The answer is \\boxed{{{r['answer']}}}.")
        assert row["answer"] == r["answer"] in ("A", "B")
        letters.append(r["answer"])
        source = load_image(src / r["source_image"])
        x0, y0, x1, y1 = r["hole_box"]
        assert x1 - x0 == y1 - y0 == 18  # round(0.25 * 72)
        ref, cand_a, cand_b = (load_image(p) for p in row["images"])
        helper = load_image(row["helper_images"][0])
        true, other = (cand_a, cand_b) if r["answer"] == "A" else (cand_b, cand_a)
        # The hole is flat gray; the rest of the reference is the source image.
        assert ref.crop(r["hole_box"]).getcolors() == [(18 * 18, HOLE_COLOR)]
        filled = ref.copy()
        filled.paste(source.crop(r["hole_box"]), (x0, y0))
        assert _same(filled, source)
        # The answer letter points at the true patch; the helper is the reference with it pasted in.
        assert _same(true, source.crop(r["hole_box"]))
        assert not _same(other, true)
        pasted = ref.copy()
        pasted.paste(true, (x0, y0))
        assert _same(helper, pasted)
    assert set(letters) == {"A", "B"}
    assert {r["source_image"] for r in raw} == {"img0.png", "img1.PNG", "img2.png"}


def _files(folder: Path) -> dict:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_deterministic_per_seed(tmp_path):
    src = _draw(tmp_path / "src")
    a = _files(generate_jigsaw(src, 5, seed=7, out=tmp_path / "a").parent)
    b = _files(generate_jigsaw(src, 5, seed=7, out=tmp_path / "b").parent)
    c = _files(generate_jigsaw(src, 5, seed=8, out=tmp_path / "c").parent)
    assert len(a) == 1 + 5 * 4 + 1  # the rows, 4 images per row, the output-folder marker
    assert json.loads(a[".mirage-trl.json"])["command"] == "data jigsaw"
    assert a == b
    assert a["jigsaw.jsonl"] != c["jigsaw.jsonl"]


def test_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(MirageError) as e:
        generate_jigsaw(tmp_path / "empty", 3, 0, tmp_path / "out")
    assert str(e.value) == f"--images: no .png/.jpg/.jpeg images in {tmp_path / 'empty'}"
    with pytest.raises(MirageError) as e:
        generate_jigsaw(tmp_path / "nope", 3, 0, tmp_path / "out")
    assert str(e.value) == f"--images: folder not found: {tmp_path / 'nope'}"

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.jpg").write_text("not a jpeg")
    with pytest.raises(MirageError) as e:
        generate_jigsaw(bad, 1, 0, tmp_path / "out")
    assert str(e.value) == f"not a readable image: {bad / 'broken.jpg'}"
    assert not (tmp_path / "out").exists()  # nothing half-written

    src = _draw(tmp_path / "src")
    with pytest.raises(MirageError) as e:
        generate_jigsaw(src, 1, 0, tmp_path / "o", patch_frac=0.5)
    assert str(e.value) == "--patch-frac: must be in (0, 0.333], got 0.5"
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (60, 60), (9, 9, 9)).save(flat / "one.png")
    with pytest.raises(MirageError) as e:
        generate_jigsaw(flat, 1, 0, tmp_path / "o")
    assert str(e.value) == (
        f"{flat / 'one.png'}: no distractor patch differs from the true patch (is the image one flat colour?)"
    )


def test_cli_jigsaw_then_check(tmp_path, capsys):
    src = _draw(tmp_path / "src", n=2)
    out = tmp_path / "out"
    args = ["data", "jigsaw", "--images", str(src), "--num-samples", "4", "--seed", "3", "--out", str(out)]
    assert main(args) == 0
    assert capsys.readouterr().out == f"wrote 4 Jigsaw rows to {out / 'jigsaw.jsonl'}\n"
    # A second run refuses the non-empty folder unless --overwrite.
    assert main(args) == 2
    assert capsys.readouterr().err == (
        f"mirage-trl data: error: --out: {out} already exists and is not empty (pass --overwrite to replace it)\n"
    )
    assert main([*args, "--overwrite"]) == 0
    capsys.readouterr()

    assert main(["data", "check", "--data", str(out / "jigsaw.jsonl"), "--benchmark", "jigsaw"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{out / 'jigsaw.jsonl'}: 4 rows, all valid"
    assert lines[-3:] == [
        "rows with a completion (text_output): 4",
        "rows with helper images: 4",
        "images checked: 16 (all exist)",
    ]
    assert any(line.split() == ["│", "jigsaw", "│", "0", "│", "4", "│"] for line in lines)

    assert main(["data", "check", "--data", str(out / "jigsaw.jsonl"), "--benchmark", "blink"]) == 2
    assert capsys.readouterr().err == (
        "mirage-trl data: error: --benchmark: unknown benchmark 'blink'; "
        "valid: vsp_planning, vsp_reasoning, vsp_grounding, jigsaw, sat, comt\n"
    )
