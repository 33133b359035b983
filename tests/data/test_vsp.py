"""VSP data: map logic, rendering against the official images, row builders, generator and CLI."""

from __future__ import annotations

import json
import re
from collections import Counter, deque
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mirage_trl.cli import main
from mirage_trl.data import vsp
from mirage_trl.data.vsp import (
    PLANNING_PROMPT,
    REASONING_PROMPT,
    find_cell,
    generate_vsp,
    random_map,
    render_map,
    shortest_path,
    simulate,
    step,
)
from mirage_trl.errors import MirageError

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
OFFICIAL = SHARED / "data" / "mirage_official" / "data"
TEST_JSONL = OFFICIAL / "vsp_spatial_planning" / "test_direct.jsonl"
SAMPLE_JSONL = OFFICIAL / "examples" / "sample.jsonl"
needs_official = pytest.mark.skipif(
    not TEST_JSONL.is_file(), reason=f"official Mirage data not found at {OFFICIAL}"
)

DELTA = {"L": (0, -1), "R": (0, 1), "U": (-1, 0), "D": (1, 0)}
WORD = {"LEFT": "L", "RIGHT": "R", "UP": "U", "DOWN": "D"}


# Independent re-implementations (docs/method.md section 1.3), written without mirage_trl's code.
def grade_walk(map_desc, answer: str):
    """Walk the answer (the last boxed one if any): upper-case, keep U/D/L/R, off-grid ignored,
    a hole fails at once. Returns (outcome, cells)."""
    boxed = re.findall(r"\\boxed\{([^}]*)\}", answer)
    answer = boxed[-1] if boxed else answer
    n = len(map_desc)
    pos = next((r, c) for r in range(n) for c in range(n) if map_desc[r][c] == 1)
    cells = [pos]
    for ch in (ch for ch in answer.upper() if ch in "UDLR"):
        r, c = pos[0] + DELTA[ch][0], pos[1] + DELTA[ch][1]
        if 0 <= r < n and 0 <= c < n:
            pos = (r, c)
        cells.append(pos)
        if map_desc[pos[0]][pos[1]] == -1:
            return "hole", cells
    return ("success" if map_desc[pos[0]][pos[1]] == 2 else "short"), cells


def goal_distance(map_desc):
    """Fewest moves from start to goal over non-hole cells (flood fill), or None."""
    n = len(map_desc)
    start = next((r, c) for r in range(n) for c in range(n) if map_desc[r][c] == 1)
    dist, queue = {start: 0}, deque([start])
    while queue:
        r, c = queue.popleft()
        if map_desc[r][c] == 2:
            return dist[(r, c)]
        for dr, dc in DELTA.values():
            nxt = (r + dr, c + dc)
            if 0 <= nxt[0] < n and 0 <= nxt[1] < n and nxt not in dist and map_desc[nxt[0]][nxt[1]] != -1:
                dist[nxt] = dist[(r, c)] + 1
                queue.append(nxt)
    return None


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def pixels(image) -> np.ndarray:
    if not isinstance(image, Image.Image):
        image = Image.open(image)
    return np.asarray(image.convert("RGB"), dtype=np.float64)


def plan_of(prompt: str) -> str:
    words = re.search(r"Full Action Plan: (.*)\n", prompt).group(1).split(", ")
    return "".join(WORD[w] for w in words)


@pytest.fixture(scope="module")
def official_rows():
    return read_jsonl(TEST_JSONL)


# ---------------------------------------------------------------------------------------------
# Map logic


def test_step_simulate_and_find_cell():
    m = [[1, 0, -1], [0, 0, 0], [0, 0, 2]]
    assert find_cell(m, 1) == (0, 0) and find_cell(m, 2) == (2, 2)
    assert step(m, (0, 0), "U") == (0, 0) and step(m, (0, 0), "L") == (0, 0)  # off the grid: no move
    assert step(m, (0, 0), vsp.Move.D) == (1, 0)
    assert simulate(m, "DDRR") == "success"
    assert simulate(m, "RRDD") == "hole"  # stops in the hole at (0,2) before going down
    assert simulate(m, "UUL") == "short"
    assert simulate(m, "") == "short"
    assert shortest_path(m) == "RDRD"  # ties broken in the order L, R, U, D
    assert shortest_path([[1, -1], [-1, 2]]) is None
    with pytest.raises(MirageError, match="no cell"):
        find_cell([[0, 2]], 1)


@needs_official
def test_bfs_plan_succeeds_and_is_shortest_on_all_official_rows(official_rows):
    assert len(official_rows) == 400
    for row in official_rows:
        plan = shortest_path(row["map_desc"])
        assert grade_walk(row["map_desc"], f"\\boxed{{{plan}}}")[0] == "success", row["map_id"]
        assert len(plan) == goal_distance(row["map_desc"])


def test_random_maps_are_valid_for_levels_2_to_8():
    import random

    rng = random.Random(0)
    for level in range(2, 9):
        for _ in range(40):
            m = random_map(level, rng)
            flat = [v for row in m for v in row]
            assert len(m) == level and all(len(row) == level for row in m)
            assert flat.count(1) == 1 and flat.count(2) == 1
            assert set(flat) <= {-1, 0, 1, 2}
            assert flat.count(-1) / level**2 <= 0.2
            assert goal_distance(m) is not None
    with pytest.raises(MirageError, match="--levels"):
        random_map(1, rng)


# ---------------------------------------------------------------------------------------------
# Rendering


@needs_official
def test_render_matches_all_official_test_images(official_rows):
    diffs = []
    for row in official_rows:
        ref = pixels(OFFICIAL / row["image_input"].removeprefix("./data/"))
        out = pixels(render_map(row["map_desc"]))
        assert out.shape == ref.shape
        diffs.append(np.abs(out - ref).mean())
    # Required: mean abs difference < 2 grey levels (2/255). Measured: about 2e-4, so a wrong sprite,
    # blend or grid line (0.09 and up) fails too.
    assert max(diffs) < 0.01, max(diffs)


def _read_map(image_path):
    """Recover a map_desc from an official step-0 image by matching each tile to rendered tiles."""
    bank = pixels(render_map([[1, -1], [2, 0]]))  # tiles: elf on start, hole, goal, ice
    tiles = {1: bank[:64, :64], -1: bank[:64, 64:], 2: bank[64:, :64], 0: bank[64:, 64:]}
    img = pixels(image_path)
    n = img.shape[0] // 64
    return [
        [
            min(
                tiles, key=lambda v: np.abs(tiles[v] - img[r * 64 : r * 64 + 64, c * 64 : c * 64 + 64]).mean()
            )
            for c in range(n)
        ]
        for r in range(n)
    ]


@needs_official
def test_render_matches_official_step_images():
    """Examples: agent after k moves facing its last move, a stool on the start, a cracked hole after a fall."""
    checked, worst = 0, 0.0
    for row in read_jsonl(SAMPLE_JSONL):
        step0 = OFFICIAL / row["image_input"].removeprefix("./data/")
        m = _read_map(step0)
        plan = plan_of(row["text_input"])
        worst = max(worst, np.abs(pixels(render_map(m)) - pixels(step0)).mean())
        _, cells = grade_walk(m, plan)
        for k in range(1, len(cells)):
            ref = step0.with_name(step0.name.replace("step_0", f"step_{k}"))
            out = render_map(m, agent=cells[k], facing=plan[k - 1])
            worst = max(worst, np.abs(pixels(out) - pixels(ref)).mean())
            checked += 1
    assert checked == 40  # every step image of the 10 examples
    assert worst < 0.01, worst  # a wrong elf direction costs 0.09 to 1.4


def test_render_sizes_and_path_arrows():
    m = [[1, 0, 0], [0, -1, 0], [0, 0, 2]]
    plain = pixels(render_map(m))
    assert plain.shape == (192, 192, 3)
    arrows = pixels(render_map(m, path="RRDD"))
    red = (arrows[..., 0] > 200) & (arrows[..., 1] < 60) & (arrows[..., 2] < 60)
    assert red[32, 40:150].all() and red[40:150, 160].all()  # along row 0 then down column 2
    assert not red[96:, :64].any()  # nothing off the path
    moved = pixels(render_map(m, agent=(0, 1), facing="R"))
    assert np.abs(moved[:64, :64] - plain[:64, :64]).mean() > 5  # the start now shows a stool, not the elf
    assert pixels(render_map([[1] + [0] * 7] + [[0] * 8] * 6 + [[0] * 7 + [2]])).shape == (512, 512, 3)


# ---------------------------------------------------------------------------------------------
# Rows and generator


@needs_official
def test_prompts_are_the_official_ones(official_rows):
    assert {row["text_input"] for row in official_rows} == {PLANNING_PROMPT}
    for row in read_jsonl(SAMPLE_JSONL):
        plan = ", ".join(re.search(r"Full Action Plan: (.*)\n", row["text_input"]).group(1).split(", "))
        assert REASONING_PROMPT.format(plan=plan) == row["text_input"]


def test_reasoning_cot_rows_are_correct_and_balanced(tmp_path):
    path = generate_vsp("reasoning", [3, 4, 5, 6], 60, "train", "cot", 1, tmp_path / "out", progress=False)
    rows = read_jsonl(path)
    assert path == tmp_path / "out" / "reasoning_train_cot.jsonl" and len(rows) == 60
    assert Counter(r["answer"] for r in rows) == {"A": 20, "B": 20, "C": 20}
    assert Counter(r["level"] for r in rows) == {3: 15, 4: 15, 5: 15, 6: 15}
    assert len({json.dumps(r["map_desc"]) for r in rows}) == 60
    root = tmp_path / "out"
    for r in rows:
        outcome, cells = grade_walk(r["map_desc"], plan_of(r["text_input"]))
        assert {"success": "A", "hole": "B", "short": "C"}[outcome] == r["answer"]
        assert r["text_output"].endswith(f"The answer is \\boxed{{{r['answer']}}}.")
        assert r["text_output"].count("<output_image>") == 1 and isinstance(r["image_output"], str)
        # The helper shows the agent after as many moves as the text describes before the marker.
        shown = r["text_output"].split("<output_image>")[0].count("Moving ")
        assert shown >= 1 and r["image_output"] == f"./images/level{r['level']}/{r['map_id']}_step{shown}.png"
        plan = plan_of(r["text_input"])
        expected = render_map(r["map_desc"], agent=cells[shown], facing=plan[shown - 1])
        assert np.array_equal(pixels(root / r["image_output"]), pixels(expected))
        assert np.array_equal(pixels(root / r["image_input"]), pixels(render_map(r["map_desc"])))
        assert r["text_output"].count("Moving ") == len(cells) - 1  # one sentence per move made
        # the helper image's text (latent_aux_text): the agent's cell, as drawn
        assert r["image_output_text"] == f"({cells[shown][0]},{cells[shown][1]})"


def test_planning_rows_direct_cot_and_test_split(tmp_path):
    direct = read_jsonl(
        generate_vsp("planning", [3, 5], 20, "train", "direct", 2, tmp_path / "d", progress=False)
    )
    cot = read_jsonl(generate_vsp("planning", [3, 5], 20, "train", "cot", 2, tmp_path / "c", progress=False))
    test = read_jsonl(
        generate_vsp("planning", [3, 5], 20, "test", "direct", 2, tmp_path / "t", progress=False)
    )
    assert [r["map_desc"] for r in direct] == [r["map_desc"] for r in cot]  # same seed, same maps
    for d, c in zip(direct, cot):
        assert grade_walk(d["map_desc"], d["text_output"])[0] == "success"
        assert len(d["answer"]) == goal_distance(d["map_desc"])
        assert d["text_output"] == f"<output_image>The answer is \\boxed{{{d['answer']}}}."
        assert c["text_output"].startswith("<think> ") and c["text_output"].count("<output_image>") == 1
        assert c["image_output"] == f"./images/level{c['level']}/{c['map_id']}_path.png"
        arrows = pixels(tmp_path / "c" / c["image_output"])
        assert np.array_equal(arrows, pixels(render_map(c["map_desc"], path=c["answer"])))
        assert d["text_input"] == PLANNING_PROMPT
        # the helper image's text (latent_aux_text): the drawn path's cells, start to goal, one move apart
        for row in (d, c):
            cells = [tuple(map(int, t.strip("()").split(","))) for t in row["image_output_text"].split()]
            assert cells[0] == next(
                (i, j) for i, r in enumerate(row["map_desc"]) for j, v in enumerate(r) if v == 1
            )
            assert row["map_desc"][cells[-1][0]][cells[-1][1]] == 2 and len(cells) == len(row["answer"]) + 1
            assert all(abs(a[0] - b[0]) + abs(a[1] - b[1]) == 1 for a, b in zip(cells, cells[1:]))
    for r in test:
        assert set(r) == {"text_input", "image_input", "map_desc", "map_id", "answer", "level"}
        assert grade_walk(r["map_desc"], r["answer"])[0] == "success"
    assert not (tmp_path / "t" / "images" / "level3" / "0_path.png").exists()
    assert [r["map_desc"] for r in test] != [r["map_desc"] for r in direct]  # the split seeds the maps too


@needs_official
def test_exclude_keeps_official_test_maps_out(tmp_path, official_rows):
    official = {json.dumps(r["map_desc"]) for r in official_rows}
    kept = read_jsonl(
        generate_vsp(
            "planning", [3], 300, "test", "direct", 0, tmp_path / "a", exclude=[TEST_JSONL], progress=False
        )
    )
    loose = read_jsonl(
        generate_vsp("planning", [3], 300, "test", "direct", 0, tmp_path / "b", progress=False)
    )
    assert len(kept) == 300 and not official & {json.dumps(r["map_desc"]) for r in kept}
    assert official & {json.dumps(r["map_desc"]) for r in loose}  # without it, level 3 collides
    # 576 level-3 maps have at most one hole (all solvable); 57 different ones are official test maps.
    with pytest.raises(MirageError, match="--num-samples: 520 level-3 maps asked for, but at most 519"):
        generate_vsp(
            "planning", [3], 520, "train", "direct", 0, tmp_path / "c", exclude=[TEST_JSONL], progress=False
        )


def test_same_seed_gives_identical_bytes(tmp_path):
    def files(out):
        return {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}

    a = generate_vsp("reasoning", [3, 4], 12, "train", "cot", 7, tmp_path / "a", progress=False)
    b = generate_vsp("reasoning", [3, 4], 12, "train", "cot", 7, tmp_path / "b", progress=False)
    c = generate_vsp("reasoning", [3, 4], 12, "train", "cot", 8, tmp_path / "c", progress=False)
    assert files(a.parent) == files(b.parent)
    assert a.read_bytes() != c.read_bytes()


def test_levels_up_to_8(tmp_path):
    rows = read_jsonl(
        generate_vsp("reasoning", [7, 8], 6, "train", "direct", 0, tmp_path / "o", progress=False)
    )
    assert sorted(Counter(r["level"] for r in rows).items()) == [(7, 3), (8, 3)]
    for r in rows:
        assert Image.open(tmp_path / "o" / r["image_input"]).size == (64 * r["level"],) * 2
        outcome, cells = grade_walk(r["map_desc"], plan_of(r["text_input"]))
        assert r["image_output"].endswith(f"_step{len(cells) - 1}.png")  # direct: the final state
        assert r["text_output"] == f"<output_image>The answer is \\boxed{{{r['answer']}}}."


def test_interrupted_run_leaves_no_output(tmp_path, monkeypatch):
    calls = []

    def flaky_render(*args, **kwargs):
        calls.append(1)
        if len(calls) > 5:
            raise KeyboardInterrupt
        return render_map(*args, **kwargs)

    monkeypatch.setattr(vsp, "render_map", flaky_render)
    with pytest.raises(KeyboardInterrupt):
        generate_vsp("planning", [3], 10, "train", "cot", 0, tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# CLI


@pytest.mark.parametrize(
    ("extra", "flag"),
    [
        (["--levels", "1", "3"], "--levels"),
        (["--levels", "3", "3"], "--levels"),
        (["--levels", "2"], "--levels"),  # reasoning: level-2 maps have no holes, so no outcome B
        (["--num-samples", "0"], "--num-samples"),
        (
            ["--levels", "2", "--num-samples", "13", "--task", "planning"],
            "--num-samples",
        ),  # 12 level-2 maps exist
        (["--exclude", "missing.jsonl"], "--exclude"),
    ],
)
def test_cli_errors_exit_2_with_one_line_and_no_output(tmp_path, capsys, monkeypatch, extra, flag):
    monkeypatch.chdir(tmp_path)
    argv = ["data", "vsp", "--task", "reasoning", "--num-samples", "6", "--out", "out"]
    assert main(argv + extra) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and flag in err and "error" in err
    assert list(tmp_path.iterdir()) == []


def test_cli_refuses_non_empty_out_and_writes_summary(tmp_path, capsys):
    out = tmp_path / "out"
    argv = [
        "data",
        "vsp",
        "--task",
        "reasoning",
        "--levels",
        "3",
        "4",
        "--num-samples",
        "9",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "3 / 3 / 3" in text and "wrote 9 rows" in text
    before = (out / "reasoning_train_cot.jsonl").read_bytes()
    assert main(argv + ["--seed", "5"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(argv + ["--seed", "5", "--overwrite"]) == 0
    assert (out / "reasoning_train_cot.jsonl").read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_bad_exclude_row_names_line_and_field(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"map_desc": [[1, 2]]}\n{"map_id": "3"}\n')
    with pytest.raises(MirageError, match=r"bad\.jsonl:2:map_desc"):
        generate_vsp("planning", [3], 5, "train", "cot", 0, tmp_path / "out", exclude=[bad], progress=False)
    assert not (tmp_path / "out").exists()


def test_grounding_rows_describe_the_map(tmp_path):
    train = read_jsonl(
        generate_vsp(
            "grounding", [3, 4], 30, "train", "direct", 1, tmp_path / "g", progress=False, max_hole_frac=0.4
        )
    )
    test = read_jsonl(generate_vsp("grounding", [3], 5, "test", "direct", 1, tmp_path / "t", progress=False))
    for r in train:
        grid = r["map_desc"]
        # independent reading of the grid: row-major scan for start (1), goal (2) and holes (-1)
        cells = {(i, j): v for i, line in enumerate(grid) for j, v in enumerate(line)}
        (start,) = [c for c, v in cells.items() if v == 1]
        (goal,) = [c for c, v in cells.items() if v == 2]
        holes = sorted(c for c, v in cells.items() if v == -1)
        tail = ", ".join(f"({a},{b})" for a, b in holes)
        expected = (
            f"The player starts at [({start[0]},{start[1]}),Start], the goal is at [({goal[0]},{goal[1]}),Target] and "
            + (f"the holes are at {tail}." if holes else "there are no holes.")
        )
        assert r["text_output"] == r["answer"] == expected
        assert r["text_input"] == vsp.GROUNDING_PROMPT and "image_output" not in r
        assert len(holes) <= int(0.4 * len(grid) ** 2)
    assert max(sum(v == -1 for line in r["map_desc"] for v in line) for r in train if r["level"] == 3) >= 2
    assert sorted(p.name for p in (tmp_path / "g" / "images" / "level3").iterdir())[:2] == ["0.png", "1.png"]
    assert all("_path" not in p.name for p in (tmp_path / "g" / "images" / "level3").iterdir())
    assert all("text_output" not in r for r in test)
    # a planning CoT opens with the same description the warm-up teaches
    cot = read_jsonl(generate_vsp("planning", [3], 3, "train", "cot", 1, tmp_path / "c", progress=False))
    assert all(c["text_output"].startswith("<think> " + vsp.describe_map(c["map_desc"])) for c in cot)


def test_grounding_cli_and_hole_fraction_errors(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["data", "vsp", "--task", "grounding", "--levels", "3", "--num-samples", "4", "--out", str(out)]
    assert main(argv + ["--max-hole-frac", "0.4"]) == 0
    text = capsys.readouterr().out
    assert "wrote 4 rows" in text and "holes per map" in text
    assert main(argv + ["--max-hole-frac", "1.5", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--max-hole-frac 1.5: must be at least 0 and below 1" in err
    assert (out / "grounding_train.jsonl").is_file()  # the good file is kept
