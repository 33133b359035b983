"""Grading: the reference rules for boxed answers, VSP planning walks and choice letters."""

from __future__ import annotations

import json
from collections import deque

import pytest

from mirage_trl.data.reference import load_rows
from mirage_trl.errors import MirageError
from mirage_trl.grading import Grade, extract_boxed, extract_choice, format_ok, grade, summarize

# 4x4: start top-left, goal bottom-right, holes at (1,1) and (2,3).
GRID = [
    [1, 0, 0, 0],
    [0, -1, 0, 0],
    [0, 0, 0, -1],
    [0, 0, 0, 2],
]
ROW = {"map_desc": json.dumps(GRID), "answer": "", "source": "t.jsonl:1"}


def plan(text: str) -> Grade:
    return grade("vsp_planning", text, ROW)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("no box here", None),
        ("\\boxed{RRD}", "RRD"),
        ("\\boxed{\\text{RRD}}", "\\text{RRD}"),
        ("\\boxed{A} then \\boxed{B}", "B"),
        ("\\boxed {C}", "C"),
        ("\\boxed{a{b{c}}d}", "a{b{c}}d"),
        ("\\boxed{A} and \\boxed{unclosed", None),
        ("", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_planning_rules():
    assert plan("I think DDDRRR") == Grade(False, True, None)  # no boxed answer
    assert plan("\\boxed{}") == Grade(False, True, None)
    assert plan("\\boxed{xyz}") == Grade(False, True, None)  # no usable letters
    assert plan("\\boxed{DDDRRR}") == Grade(True, False, "DDDRRR")
    assert plan("\\boxed{\\text{DDDRRR}}") == Grade(True, False, "DDDRRR")  # nested braces
    assert plan("\\boxed{UUU} wait, \\boxed{DDDRRR}") == Grade(True, False, "DDDRRR")  # last box wins
    assert plan("\\boxed{DDDRRR} no: \\boxed{UUU}") == Grade(False, False, "UUU")
    assert plan("\\boxed{dddrrr}") == Grade(True, False, "DDDRRR")  # lower case
    # Words keep only their U/D/L/R letters: DOWN -> D, RIGHT -> R, LEFT -> L, UP -> U.
    assert plan("\\boxed{DOWN, DOWN, DOWN, RIGHT, RIGHT, RIGHT}") == Grade(True, False, "DDDRRR")
    assert plan("\\boxed{RIGHT, DOWN}") == Grade(False, False, "RD")
    assert plan("\\boxed{L, U, L, DDD, RRR}") == Grade(True, False, "LULDDDRRR")  # off-grid moves ignored
    assert plan("\\boxed{DDDRRRRRDDD}") == Grade(True, False, "DDDRRRRRDDD")  # off-grid at the goal too
    # Entering a hole fails at once, even though the rest of the walk would end on the goal.
    assert plan("\\boxed{RDDDRR}") == Grade(False, False, "RDDDRR")  # hole (1,1)
    assert plan("\\boxed{RRRDDD}") == Grade(False, False, "RRRDDD")  # hole (2,3)
    assert plan("\\boxed{DDDRR}") == Grade(False, False, "DDDRR")  # ends short
    assert plan("\\boxed{DDDRRRU}") == Grade(False, False, "DDDRRRU")  # passes the goal, ends elsewhere


def test_planning_needs_grid():
    with pytest.raises(MirageError) as e:
        grade("vsp_planning", "\\boxed{R}", {"map_desc": "", "source": "x.jsonl:4"})
    assert str(e.value) == "x.jsonl:4: vsp_planning grading needs the row's map_desc (the grid)"
    # map_desc given as a list works as well as the JSON string.
    assert grade("vsp_planning", "\\boxed{R}", {"map_desc": [[1, 2]]}) == Grade(True, False, "R")


@pytest.mark.parametrize(
    "boxed, letter",
    [
        ("A", "A"),
        ("(A)", "A"),
        ("A.", "A"),
        ("A. Action Success", "A"),
        (" B ", "B"),
        ("\\text{C}", "C"),
        ("c", "C"),
        ("B) fails", "B"),
        ("Action Success", None),
        ("", None),
        ("AB", None),
    ],
)
def test_choice_letters(boxed, letter):
    assert extract_choice(boxed) == letter
    result = grade("vsp_reasoning", f"<think>x</think> \\boxed{{{boxed}}}", {"answer": "A"})
    assert result == Grade(letter == "A", letter is None, letter)


def test_choice_benchmarks_and_errors():
    assert grade("jigsaw", "\\boxed{B}", {"answer": "B"}) == Grade(True, False, "B")
    assert grade("sat", "\\boxed{(B)}", {"answer": "(C)"}) == Grade(False, False, "B")
    assert grade("comt", "no box", {"answer": "A"}) == Grade(False, True, None)
    with pytest.raises(MirageError) as e:
        grade("blink", "\\boxed{A}", {"answer": "A"})
    assert (
        str(e.value)
        == "unknown benchmark 'blink'; valid: vsp_planning, vsp_reasoning, vsp_grounding, jigsaw, sat, comt"
    )
    with pytest.raises(MirageError) as e:
        grade("jigsaw", "\\boxed{A}", {"answer": "", "source": "j.jsonl:3"})
    assert str(e.value) == "j.jsonl:3: jigsaw grading needs the row's reference answer letter, got ''"


def test_format_ok():
    assert format_ok("<think> a\nb </think> The answer is \\boxed{A}.")
    assert not format_ok("The answer is \\boxed{A}.")
    assert not format_ok("<think> a </think> The answer is A.")
    assert not format_ok("<think> never closed \\boxed{A}")


def test_summarize():
    grades = [
        Grade(True, False, "R"),
        Grade(False, True, None),
        Grade(False, False, "L"),
        Grade(True, False, "U"),
    ]
    out = summarize(grades, [4, 3, 4, 4])
    assert list(out) == [3, 4, "all"]
    assert out[3] == {"n": 1, "correct": 0, "invalid": 1, "accuracy": 0.0, "invalid_rate": 1.0}
    assert out[4] == {"n": 3, "correct": 2, "invalid": 0, "accuracy": 2 / 3, "invalid_rate": 0.0}
    assert out["all"] == {"n": 4, "correct": 2, "invalid": 1, "accuracy": 0.5, "invalid_rate": 0.25}


def _bfs(grid) -> str:
    """Shortest safe U/D/L/R path from start (1) to goal (2); off-grid moves are simply not taken."""
    n, m = len(grid), len(grid[0])
    start = next((i, j) for i in range(n) for j in range(m) if grid[i][j] == 1)
    queue, seen = deque([(start, "")]), {start}
    while queue:
        (i, j), path = queue.popleft()
        if grid[i][j] == 2:
            return path
        for move, (di, dj) in (("U", (-1, 0)), ("D", (1, 0)), ("L", (0, -1)), ("R", (0, 1))):
            ni, nj = i + di, j + dj
            if 0 <= ni < n and 0 <= nj < m and grid[ni][nj] != -1 and (ni, nj) not in seen:
                seen.add((ni, nj))
                queue.append(((ni, nj), path + move))
    raise AssertionError(f"unsolvable grid {grid}")


def test_bfs_shortest_paths_grade_correct_on_reference_test_set(official_data):
    rows = load_rows(official_data / "vsp_spatial_planning" / "test_direct.jsonl", check_images=False)
    assert len(rows) == 400
    results = []
    for row in rows:
        path = _bfs(json.loads(row["map_desc"]))
        assert len(path) > 0
        results.append(grade("vsp_planning", f"The plan is \\boxed{{{path}}}.", row))
        # Dropping the last move always ends short of the goal.
        assert grade("vsp_planning", f"\\boxed{{{path[:-1]}}}", row).correct is False
    assert all(r.correct and not r.invalid for r in results)
    summary = summarize(results, [r["level"] for r in rows])
    assert [(k, v["n"], v["accuracy"]) for k, v in summary.items()] == [
        (3, 100, 1.0),
        (4, 100, 1.0),
        (5, 100, 1.0),
        (6, 100, 1.0),
        ("all", 400, 1.0),
    ]


def test_grounding_description_rules():
    grid = [[1, 0, -1], [0, -1, 0], [0, 0, 2]]
    row = {"map_desc": grid}

    def g(text):
        return grade("vsp_grounding", text, row)

    right = (
        "The player starts at [(0,0),Start], the goal is at [(2,2),Target] and the holes are at (0,2), (1,1)."
    )
    assert g(right) == Grade(True, False, right[len("The player ") : -1])
    assert g(right.replace("(0,2), (1,1)", "(1,1), (0,2)")).correct  # a set: order does not matter
    assert not g(right.replace(", (1,1)", "")).correct  # a hole missing
    assert not g(right.replace("(1,1)", "(1,1), (2,0)")).correct  # one too many
    assert not g(right.replace("[(0,0),Start]", "[(0,1),Start]")).correct  # wrong start
    assert not g(right.replace("[(2,2),Target]", "[(3,3),Target]")).correct  # off the grid
    assert not g(right.replace("the holes are at (0,2), (1,1)", "there are no holes")).correct
    assert g("The answer is \\boxed{R}.") == Grade(False, True, None)  # no description at all
    free = [[1, 0], [0, 2]]
    text = "The player starts at [(0,0),Start], the goal is at [(1,1),Target] and there are no holes."
    assert grade("vsp_grounding", text, {"map_desc": free}).correct
    # only the first description counts
    assert not grade("vsp_grounding", text.replace("(1,1)", "(1,0)") + " " + text, {"map_desc": free}).correct
    with pytest.raises(MirageError, match="vsp_grounding grading needs the row's map_desc"):
        grade("vsp_grounding", text, {"map_desc": ""})
