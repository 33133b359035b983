"""Grade completions exactly as the Mirage reference does (docs section 1.3), so numbers compare.

- The answer is the content of the last `\\boxed{...}`.
- VSP planning: upper-case it, keep only U/D/L/R in order, walk from the start cell; off-grid
  moves are ignored, entering a hole fails at once, success iff the walk ends on the goal.
- Choice benchmarks (VSP reasoning, Jigsaw, SAT, COMT): the boxed choice letter equals the reference.
- VSP grounding (ours, the warm-up that teaches a small model to read maps): the first description
  "The player starts at [(r,c),...], the goal is at [(r,c),...] and the holes are at (r,c), ..."
  (or "... and there are no holes") names exactly the map's start, goal and set of holes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .errors import MirageError

BENCHMARKS = ("vsp_planning", "vsp_reasoning", "vsp_grounding", "jigsaw", "sat", "comt")
GRID_BENCHMARKS = ("vsp_planning", "vsp_grounding")  # graded against the row's map_desc
CHOICE_BENCHMARKS = ("vsp_reasoning", "jigsaw", "sat", "comt")


def one_of(names) -> str:
    """`a, b or c`: how help texts list choices."""
    names = list(names)
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


_BOXED = re.compile(r"\\boxed\s*\{")
_MOVES = {"U": (-1, 0), "D": (1, 0), "L": (0, -1), "R": (0, 1)}
_WRAPPER = re.compile(r"^\\[A-Za-z]+\s*\{(.*)\}$", re.S)  # \text{A}, \mathrm{A}
_CHOICE = re.compile(r"^\(?([A-Za-z])\)?(?=$|[\s.:,;)])")
_THINK = re.compile(r"<think>.*?</think>", re.S)
_CELL = r"\((\d+),\s*(\d+)\)"
_DESCRIPTION = re.compile(
    rf"starts at \[?{_CELL}[^\]]*\]?, the goal is at \[?{_CELL}[^\]]*\]? and "
    rf"(?:there are no holes|the holes are at ((?:{_CELL}(?:,\s*)?)+))"
)


@dataclass(frozen=True)
class Grade:
    correct: bool
    invalid: bool  # no usable answer: no boxed content, no U/D/L/R letters, or no choice letter
    answer: str | None  # what was graded: the move letters or the choice letter


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (nested braces kept), or None if there is none or it is unclosed."""
    if not text:
        return None
    matches = list(_BOXED.finditer(text))
    if not matches:
        return None
    start = matches[-1].end()
    depth = 1
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start:i]
    return None


def extract_choice(answer: str | None) -> str | None:
    """The choice letter of `A`, `(A)`, `A.`, `A. Action Success`, `\\text{A}`; None if there is none."""
    if answer is None:
        return None
    answer = answer.strip()
    while (m := _WRAPPER.match(answer)) is not None:
        answer = m.group(1).strip()
    m = _CHOICE.match(answer)
    return m.group(1).upper() if m else None


def format_ok(completion: str) -> bool:
    """A `<think>...</think>` block and a boxed answer (the GRPO format reward)."""
    return bool(_THINK.search(completion or "")) and extract_boxed(completion) is not None


def check_benchmark(benchmark: str) -> str:
    if benchmark not in BENCHMARKS:
        raise MirageError(f"unknown benchmark {benchmark!r}; valid: {', '.join(BENCHMARKS)}")
    return benchmark


def _source(row: Mapping) -> str:
    return f"{row['source']}: " if row.get("source") else ""


def _grid(row: Mapping, benchmark: str) -> list[list[int]]:
    grid = row.get("map_desc")
    if isinstance(grid, str):
        grid = json.loads(grid) if grid.strip() else None
    if not grid:
        raise MirageError(f"{_source(row)}{benchmark} grading needs the row's map_desc (the grid)")
    return grid


def walk_plan(grid: list[list[int]], moves: str) -> bool:
    """Reference rule: walk `moves` (U/D/L/R) from the start; True iff it ends on the goal without a hole."""
    rows = len(grid)
    r, c = next((i, j) for i, line in enumerate(grid) for j, v in enumerate(line) if v == 1)
    for move in moves:
        dr, dc = _MOVES[move]
        nr, nc = r + dr, c + dc
        if not (0 <= nr < rows and 0 <= nc < len(grid[nr])):
            continue  # off the grid: the player stays
        r, c = nr, nc
        if grid[r][c] == -1:
            return False  # a hole ends the game at once
    return grid[r][c] == 2


def grade_description(grid: list[list[int]], completion: str) -> Grade:
    """VSP grounding: the completion's first map description names exactly the grid's start, goal and holes."""
    m = _DESCRIPTION.search(completion or "")
    if m is None:
        return Grade(False, True, None)
    start, goal = (int(m[1]), int(m[2])), (int(m[3]), int(m[4]))
    holes = {(int(r), int(c)) for r, c in re.findall(_CELL, m[5] or "")}
    cells = {(i, j): v for i, line in enumerate(grid) for j, v in enumerate(line)}
    correct = (
        cells.get(start) == 1
        and cells.get(goal) == 2
        and holes == {cell for cell, v in cells.items() if v == -1}
    )
    return Grade(correct, False, m[0])


def grade(benchmark: str, completion: str, row: Mapping) -> Grade:
    """Grade one completion against a loaded row (needs `answer`; `map_desc` for the VSP grid benchmarks)."""
    check_benchmark(benchmark)
    if benchmark == "vsp_grounding":
        return grade_description(_grid(row, benchmark), completion)
    boxed = extract_boxed(completion)
    if benchmark == "vsp_planning":
        grid = _grid(row, benchmark)
        if boxed is None:
            return Grade(False, True, None)
        moves = "".join(ch for ch in boxed.upper() if ch in _MOVES)
        if not moves:
            return Grade(False, True, None)
        return Grade(walk_plan(grid, moves), False, moves)
    reference = extract_choice(str(row.get("answer") or ""))
    if reference is None:
        raise MirageError(
            f"{_source(row)}{benchmark} grading needs the row's reference answer letter, got {row.get('answer')!r}"
        )
    choice = extract_choice(boxed)
    if choice is None:
        return Grade(False, True, None)
    return Grade(choice == reference, False, choice)


def summarize(grades: Iterable[Grade], groups: Iterable) -> dict:
    """Per-group counts: `{group: {"n", "correct", "invalid", "accuracy", "invalid_rate"}}`, plus `"all"`.

    Groups come out sorted (levels 3..6 in order); `"all"` is last.
    """
    counts: dict = {}
    total = {"n": 0, "correct": 0, "invalid": 0}
    for g, group in zip(grades, groups, strict=True):
        for bucket in (counts.setdefault(group, {"n": 0, "correct": 0, "invalid": 0}), total):
            bucket["n"] += 1
            bucket["correct"] += int(g.correct)
            bucket["invalid"] += int(g.invalid)
    out = {k: counts[k] for k in sorted(counts, key=lambda k: (str(type(k)), k))}
    out["all"] = total
    for bucket in out.values():
        n = bucket["n"]
        bucket["accuracy"] = bucket["correct"] / n if n else 0.0
        bucket["invalid_rate"] = bucket["invalid"] / n if n else 0.0
    return out
