"""VSP (visual spatial planning on FrozenLake): map logic, row builders and the data generator.

Two tasks, as in the Mirage paper (docs/method.md section 1.2):
- planning: give the shortest safe move plan (letters L/R/U/D, boxed); the helper image is the
  start map with the solution drawn as red arrows;
- reasoning: is a given plan a success (A), a fall into a hole (B) or safe but short of the
  goal (C)? The helper image is the map with the agent part-way along the plan, a stool on
  the start.
Training rows also say in words what their helper image shows (`image_output_text`: the cells of the drawn
path; the agent's cell), for the auxiliary decoding of the latents (`latent_aux_text`).

and one that is not in the paper:
- grounding: say where the player, the goal and the holes are, in the words a planning chain of
  thought opens with. A warm-up that teaches a small model trained from scratch to read the maps
  (docs/experiments.md, "Giving a small model sight"); text only, no helper image.

Maps are `map_desc` grids, row-major: 1 start, 0 ice, -1 hole, 2 goal; U is row - 1. A move
off the grid is ignored; entering a hole ends the walk at once (section 1.3's grader).

`generate_vsp` writes `<task>_<split>_<style>.jsonl` in the reference format plus PNGs under
`images/`, with image paths like `./images/level3/12.png` relative to the output folder
(the dataset root is the output folder itself).
"""

from __future__ import annotations

import contextlib
import enum
import json
import math
import random
from collections import deque
from pathlib import Path

from ..errors import MirageError, where
from ..folders import atomic_dir, check_output_dir
from ..io import write_jsonl
from .vsp_render import GOAL, HOLE, ICE, START, render_map

__all__ = [
    "GOAL",
    "HOLE",
    "ICE",
    "START",
    "Move",
    "GROUNDING_PROMPT",
    "PLANNING_PROMPT",
    "REASONING_PROMPT",
    "find_cell",
    "step",
    "walk",
    "simulate",
    "shortest_path",
    "random_map",
    "render_map",
    "describe_map",
    "grounding_row",
    "planning_row",
    "reasoning_row",
    "random_plan",
    "load_map_descs",
    "generate_vsp",
]


class Move(str, enum.Enum):
    """A move letter; `delta` is (d_row, d_col) in a row-major grid, `word` the prompt spelling."""

    L = "L"
    R = "R"
    U = "U"
    D = "D"

    @property
    def delta(self) -> tuple[int, int]:
        return {"L": (0, -1), "R": (0, 1), "U": (-1, 0), "D": (1, 0)}[self.value]

    @property
    def word(self) -> str:
        return {"L": "LEFT", "R": "RIGHT", "U": "UP", "D": "DOWN"}[self.value]


OUTCOMES = {"success": "A", "hole": "B", "short": "C"}
TASKS = ("reasoning", "planning", "grounding")
SPLITS = ("train", "test")
STYLES = ("direct", "cot")
_CELL_NAMES = {ICE: "Ice", HOLE: "Hole", START: "Start", GOAL: "Target"}

# Exactly the prompt of the official planning test rows (test_direct.jsonl).
PLANNING_PROMPT = (
    "\nAs a professional maze solver, your task is to analyze a grid-based map and devise an action plan that "
    "enables a player to reach the goal from the starting point without falling into any holes, using the "
    "fewest possible moves.\n\n## Game Setup\n- The game presents a fully observable grid-based map.\n- The "
    "player starts at a specified grid square, with the goal located elsewhere on the map.\n- Each grid square "
    "is either safe or contains a hole.\n- Your goal is to guide the player to the goal while avoiding holes."
    "\n\n\n## Moving Rules\n- The action plan involves a series of moves: 'L' (left), 'R' (right), 'U' (up), "
    "or 'D' (down).\n- Each move transfers the player to the adjacent square in that direction, provided it "
    "is a safe square. The player cannot move more than one square at a time.\n- Moving off the edge of the "
    "map has no effect. The player will remain at the same square.\n- DO NOT MOVE INTO A HOLE! Falling into a "
    "hole results in defeat.\n- Locating at the grid containing the goal results in victory.\n\nHere is the "
    "map: <image>\n\nPlease provide your action plan.\n The final answer MUST BE put in \\boxed{}."
)

# Exactly the prompt of the official reasoning rows (examples/sample.jsonl); {plan} = "RIGHT, UP, ...".
# (The typo "faile" is the original's.)
REASONING_PROMPT = (
    "\nAs a professional maze solver, your task is to analyze a grid-based map and decide whether a given "
    "action plan enables a player to reach the goal from the starting point without falling into any holes."
    "\n\n## Setup\n- The game presents a fully observable grid-based map.\n- The player starts at a specified "
    "grid square, with the goal located elsewhere on the map.\n- Each grid square is either safe or contains "
    "a hole.\n- The provided action plan consists of a series of moves: 'LEFT' (left), 'RIGHT' (right), 'UP' "
    "(up), or 'DOWN' (down).\n- Each move transfers the player to the adjacent square in that direction, "
    "provided it is a safe square. The player cannot move more than one square at a time.\n- Moving off the "
    "edge of the map has no effect. The player will remain at the same square.\n- For each action plan and "
    "map, there are 3 possible outcomes:\n    - A. Action Success.\n    - B. Action Failed. Falling into a "
    "hole.\n    - C. Action Failed. Player safe but faile to reach the goal.\n\nDetermine the outcome of the "
    "action plan based on the map, and provide your answer with A, B, or C. \n\nHere is the map: <image>\n\n"
    "Full Action Plan: {plan}\n\nPlease provide your answer.\n You FIRST think about the reasoning process as "
    "an internal monologue and then provide the final answer. The reasoning process MUST BE enclosed within "
    "<think> </think> tags. The final answer MUST BE put in \\boxed{{}}."
)


# Ours (no official counterpart): the grounding warm-up asks only what a planning CoT states first.
GROUNDING_QUESTION = "Where are the player, the goal and the holes?"  # how a loaded row is recognised
GROUNDING_PROMPT = f"Here is the map: <image>\n\n{GROUNDING_QUESTION} Give each grid square as (row,column)."


# ---------------------------------------------------------------------------------------------
# Map logic


def find_cell(map_desc, value: int) -> tuple[int, int]:
    """The first (row, col) holding `value`, row-major; MirageError if there is none."""
    for r, row in enumerate(map_desc):
        for c, v in enumerate(row):
            if v == value:
                return (r, c)
    raise MirageError(f"map_desc: no cell with value {value} ({_CELL_NAMES.get(value, '?')})")


def step(map_desc, pos: tuple[int, int], move) -> tuple[int, int]:
    """The cell one `move` away from `pos`; a move off the grid leaves `pos` unchanged."""
    dr, dc = Move(move).delta
    r, c = pos[0] + dr, pos[1] + dc
    if 0 <= r < len(map_desc) and 0 <= c < len(map_desc[r]):
        return (r, c)
    return tuple(pos)


def walk(map_desc, moves, start: tuple[int, int] | None = None) -> list[tuple[int, int]]:
    """Cells visited, starting cell first; the walk stops at once on a hole (later moves unused)."""
    pos = tuple(start) if start is not None else find_cell(map_desc, START)
    cells = [pos]
    for move in moves:
        if map_desc[pos[0]][pos[1]] == HOLE:
            break
        pos = step(map_desc, pos, move)
        cells.append(pos)
    return cells


def simulate(map_desc, moves) -> str:
    """Outcome of a plan: "success" (ends on the goal), "hole" (fell in) or "short" (safe elsewhere)."""
    r, c = walk(map_desc, moves)[-1]
    value = map_desc[r][c]
    return "hole" if value == HOLE else "success" if value == GOAL else "short"


def shortest_path(map_desc, start: tuple[int, int] | None = None) -> str | None:
    """A shortest hole-free plan from `start` (default: the start cell) to the goal, or None.

    Breadth-first search expanding moves in the order L, R, U, D, so the answer is deterministic.
    """
    start = tuple(start) if start is not None else find_cell(map_desc, START)
    goal = find_cell(map_desc, GOAL)
    parent = {start: None}
    queue = deque([start])
    while queue:
        pos = queue.popleft()
        if pos == goal:
            moves = []
            while parent[pos] is not None:
                pos, move = parent[pos]
                moves.append(move)
            return "".join(reversed(moves))
        for move in Move:
            nxt = step(map_desc, pos, move)
            if nxt not in parent and map_desc[nxt[0]][nxt[1]] != HOLE:
                parent[nxt] = (pos, move.value)
                queue.append(nxt)
    return None


def max_holes(level: int, max_hole_frac: float = 0.2) -> int:
    return min(level * level - 2, math.floor(max_hole_frac * level * level + 1e-9))


def random_map(level: int, rng: random.Random, max_hole_frac: float = 0.2) -> list[list[int]]:
    """A solvable `level` x `level` map: random start and goal, at most `max_hole_frac` holes.

    Like gymnasium's `generate_random_map` each other cell is a hole with probability
    `max_hole_frac`, but draws over the cap (or unsolvable ones) are redrawn.
    """
    if level < 2:
        raise MirageError(
            f"--levels: level {level} is too small (the grid needs a start and a goal: 2 or more)"
        )
    cap = max_holes(level, max_hole_frac)
    cells = [(r, c) for r in range(level) for c in range(level)]
    while True:
        start, goal = rng.sample(cells, 2)
        grid = [[ICE] * level for _ in range(level)]
        grid[start[0]][start[1]] = START
        grid[goal[0]][goal[1]] = GOAL
        holes = [cell for cell in cells if cell not in (start, goal) and rng.random() < max_hole_frac]
        if len(holes) > cap:
            continue
        for r, c in holes:
            grid[r][c] = HOLE
        if shortest_path(grid) is not None:
            return grid


def _map_key(map_desc) -> tuple:
    return tuple(tuple(int(v) for v in row) for row in map_desc)


def _holes(map_desc) -> int:
    return sum(v == HOLE for row in map_desc for v in row)


def count_maps_upper(level: int, max_hole_frac: float = 0.2) -> int:
    """Maps with one start, one goal and at most the cap of holes (solvable or not): an upper bound."""
    n = level * level
    return n * (n - 1) * sum(math.comb(n - 2, k) for k in range(max_holes(level, max_hole_frac) + 1))


# ---------------------------------------------------------------------------------------------
# Reasoning plans


def _at(map_desc, pos) -> int:
    return map_desc[pos[0]][pos[1]]


def _safe_walk(map_desc, pos, length: int, rng: random.Random):
    """`length` random moves that never enter a hole or the goal (edge bumps allowed), or None."""
    moves = []
    for _ in range(length):
        options = [m.value for m in Move if _at(map_desc, step(map_desc, pos, m)) in (ICE, START)]
        if not options:
            return None, pos
        move = rng.choice(options)
        moves.append(move)
        pos = step(map_desc, pos, move)
    return "".join(moves), pos


def random_plan(map_desc, outcome: str, rng: random.Random, tries: int = 20) -> str | None:
    """A move plan with the given outcome ("success" | "hole" | "short"), or None if none was found.

    success: a short safe detour then a shortest path to the goal (the goal is only reached at the end);
    hole: a safe detour then a step into an adjacent hole, sometimes followed by moves never made;
    short: a safe random walk that never touches the goal.
    """
    side = len(map_desc)
    start = find_cell(map_desc, START)
    for _ in range(tries):
        if outcome == "success":
            detour, pos = _safe_walk(map_desc, start, rng.randint(0, 2), rng)
            rest = shortest_path(map_desc, pos) if detour is not None else None
            plan = None if rest is None else detour + rest
        elif outcome == "hole":
            detour, pos = _safe_walk(map_desc, start, rng.randint(0, side - 1), rng)
            into = [m.value for m in Move if _at(map_desc, step(map_desc, pos, m)) == HOLE]
            if detour is None or not into:
                continue
            plan = detour + rng.choice(into)
            if rng.random() < 0.5:
                plan += "".join(rng.choice("LRUD") for _ in range(rng.randint(1, 2)))
        elif outcome == "short":
            plan, _ = _safe_walk(map_desc, start, rng.randint(1, 2 * side - 1), rng)
        else:
            raise ValueError(f"unknown outcome {outcome!r}")
        if plan and len(plan) <= 3 * side and simulate(map_desc, plan) == outcome:
            return plan
    return None


# ---------------------------------------------------------------------------------------------
# Rows


def _cell(map_desc, pos) -> str:
    return f"[({pos[0]},{pos[1]}),{_CELL_NAMES[map_desc[pos[0]][pos[1]]]}]"


def _step_texts(map_desc, plan: str) -> list[str]:
    """One sentence per move actually made (the walk stops in a hole)."""
    cells = walk(map_desc, plan)
    texts = []
    for move, before, after in zip(plan, cells, cells[1:]):
        word = Move(move).word
        value = map_desc[after[0]][after[1]]
        if after == before:
            texts.append(
                f"Moving {word} runs into the edge of the map, so I stay at {_cell(map_desc, after)}."
            )
        elif value == HOLE:
            texts.append(f"Moving {word} to {_cell(map_desc, after)} drops me into a hole and ends the game.")
        elif value == GOAL:
            texts.append(f"Moving {word} to {_cell(map_desc, after)} reaches the goal.")
        else:
            texts.append(f"Moving {word} to {_cell(map_desc, after)} keeps me on safe ground.")
    return texts


def path_text(map_desc, moves: str) -> str:
    """The cells a walk crosses, start included, as a helper image's text (`image_output_text`): what the
    drawn path shows, in words, for the auxiliary decoding of the latents (`latent_aux_text`)."""
    return " ".join(f"({r},{c})" for r, c in walk(map_desc, moves))


def _think(steps, before: str = "", after: str = "") -> str:
    """One think block: optional lead-in, the step sentences chained with "Next,", optional wrap-up."""
    return (
        "<think> " + " ".join(part for part in (before, " Next, ".join(steps), after) if part) + " </think>"
    )


def _boxed(answer: str) -> str:
    return f"The answer is \\boxed{{{answer}}}."


def describe_map(map_desc) -> str:
    """Where the start, the goal and the holes are: a planning CoT's first sentence, a grounding answer."""
    start, goal = find_cell(map_desc, START), find_cell(map_desc, GOAL)
    holes = [f"({r},{c})" for r, row_ in enumerate(map_desc) for c, v in enumerate(row_) if v == HOLE]
    where_holes = f"the holes are at {', '.join(holes)}" if holes else "there are no holes"
    return f"The player starts at {_cell(map_desc, start)}, the goal is at {_cell(map_desc, goal)} and {where_holes}."


def grounding_row(map_desc, map_id: str, image: str, style: str | None) -> dict:
    """A grounding row (`style` None: test split, no text_output); `answer` is the description."""
    answer = describe_map(map_desc)
    row = {"text_input": GROUNDING_PROMPT, "image_input": image}
    if style is not None:
        row["text_output"] = answer
    return row | {"map_desc": map_desc, "map_id": map_id, "answer": answer}


def planning_row(map_desc, map_id: str, image: str, style: str | None, helper: str | None) -> dict:
    """A planning row; `style` None (test split) leaves out text_output / image_output."""
    answer = shortest_path(map_desc)
    if answer is None:
        raise MirageError(f"map {map_id}: the goal cannot be reached")
    row = {"text_input": PLANNING_PROMPT, "image_input": image}
    if style == "direct":
        row |= {"text_output": "<output_image>" + _boxed(answer), "image_output": helper}
    elif style == "cot":
        intro = describe_map(map_desc)
        check = f"The drawn path takes {len(answer)} moves and never enters a hole, and no shorter safe path exists."
        row |= {
            "text_output": _think(_step_texts(map_desc, answer), before=intro)
            + "<output_image>"
            + _think([], after=check)
            + _boxed(answer),
            "image_output": helper,
        }
    if style is not None and helper:
        row["image_output_text"] = path_text(map_desc, answer)
    return row | {"map_desc": map_desc, "map_id": map_id, "answer": answer}


def reasoning_row(
    map_desc, map_id: str, plan: str, image: str, style: str | None, helper: str | None, shown: int
) -> dict:
    """A reasoning row for `plan`; the helper image shows the agent after `shown` moves."""
    outcome = simulate(map_desc, plan)
    answer = OUTCOMES[outcome]
    row = {
        "text_input": REASONING_PROMPT.format(plan=", ".join(Move(m).word for m in plan)),
        "image_input": image,
    }
    if style is not None:
        texts = _step_texts(map_desc, plan)
        end = walk(map_desc, plan)[-1]
        conclusion = {
            "success": f"The plan ends on the goal at {_cell(map_desc, end)} without falling into a hole, so it succeeds.",
            "hole": f"The player fell into the hole at {_cell(map_desc, end)}"
            + (", so the remaining moves are never made." if len(texts) < len(plan) else "."),
            "short": f"The plan ends safely at {_cell(map_desc, end)}, which is not the goal.",
        }[outcome]
        if style == "direct":
            text = "<output_image>" + _boxed(answer)
        else:
            text = (
                _think(texts[:shown])
                + "<output_image>"
                + _think(texts[shown:], after=conclusion)
                + _boxed(answer)
            )
        row |= {"text_output": text, "image_output": helper}
        if helper:  # the helper image shows the agent after `shown` moves: its cell
            row["image_output_text"] = path_text(map_desc, plan[:shown]).rsplit(" ", 1)[-1]
    return row | {"map_desc": map_desc, "map_id": map_id, "answer": answer}


# ---------------------------------------------------------------------------------------------
# Generator


def load_map_descs(paths, flag: str = "--exclude") -> set:
    """The `map_desc` grids of every row of the given JSONL files (as hashable tuples)."""
    keys = set()
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise MirageError(f"{flag}: {path} is not a file")
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise MirageError(f"{where(path, line_no)}: not valid JSON ({e.msg})") from None
                desc = row.get("map_desc") if isinstance(row, dict) else None
                if not isinstance(desc, list) or not all(isinstance(r, list) for r in desc):
                    raise MirageError(
                        f"{where(path, line_no, 'map_desc')}: missing or not a grid (list of lists)"
                    )
                keys.add(_map_key(desc))
    return keys


def _check_request(task, levels, num_samples, split, style, max_hole_frac) -> list[int]:
    if task not in TASKS:
        raise MirageError(f"--task: {task!r} is not one of {', '.join(TASKS)}")
    if split not in SPLITS:
        raise MirageError(f"--split: {split!r} is not one of {', '.join(SPLITS)}")
    if style not in STYLES:
        raise MirageError(f"--style: {style!r} is not one of {', '.join(STYLES)}")
    if not 0.0 <= max_hole_frac < 1.0:
        raise MirageError(f"--max-hole-frac {max_hole_frac}: must be at least 0 and below 1")
    levels = [int(level) for level in levels]
    if not levels:
        raise MirageError("--levels: give at least one level")
    if len(set(levels)) != len(levels):
        raise MirageError(f"--levels: a level is given twice ({' '.join(map(str, levels))})")
    for level in levels:
        if level < 2:
            raise MirageError(
                f"--levels: level {level} is too small (the grid needs a start and a goal: 2 or more)"
            )
        if level > 32:
            raise MirageError(f"--levels: level {level} is too large (32 at most)")
        if task == "reasoning" and max_holes(level, max_hole_frac) == 0:
            raise MirageError(
                f"--levels: level {level} maps have no holes, so reasoning outcome B cannot occur (use 3 or more)"
            )
    if num_samples < 1:
        raise MirageError(f"--num-samples: must be at least 1 (got {num_samples})")
    if num_samples > MAX_GENERATED_ROWS:
        raise MirageError(
            f"--num-samples: {num_samples} rows would take hours to render; ask for at most {MAX_GENERATED_ROWS} "
            "per run (several runs with other seeds and --exclude give more)"
        )
    return levels


# One run renders a few hundred maps a second on one core: past this a request would not finish soon.
MAX_GENERATED_ROWS = 1_000_000


def _sample_level(task, level, count, first_index, rng, excluded, max_hole_frac) -> list[tuple]:
    """`count` unique (map, plan or None) pairs for one level; MirageError when they run out."""
    upper = count_maps_upper(level, max_hole_frac)
    cap = max_holes(level, max_hole_frac)
    upper -= sum(
        1
        for key in excluded
        if len(key) == level
        and sorted(v for row in key for v in row if v != ICE) == [HOLE] * _holes(key) + [START, GOAL]
        and _holes(key) <= cap
    )
    if count > upper:
        raise MirageError(
            f"--num-samples: {count} level-{level} maps asked for, but at most {upper} different ones exist "
            f"(at most {cap} holes{', after --exclude' if excluded else ''}); ask for fewer or add levels"
        )
    budget = max(2000, min(200_000, 10 * upper))  # consecutive misses before we call the level exhausted
    chosen, seen, misses = [], set(), 0
    while len(chosen) < count:
        desc = random_map(level, rng, max_hole_frac)
        key = _map_key(desc)
        plan = None
        if key not in seen and key not in excluded and task == "reasoning":
            outcome = ("success", "hole", "short")[(first_index + len(chosen)) % 3]
            plan = random_plan(desc, outcome, rng)
        if key in seen or key in excluded or (task == "reasoning" and plan is None):
            misses += 1
            if misses > budget:
                raise MirageError(
                    f"--num-samples: found only {len(chosen)} of the {count} unique level-{level} maps asked for "
                    f"(after {budget} draws without a new one; {len(excluded)} maps excluded); ask for fewer or add levels"
                )
            continue
        misses = 0
        seen.add(key)
        chosen.append((desc, plan))
    return chosen


def output_name(task: str, split: str, style: str) -> str:
    # a grounding answer is a description, neither direct nor a chain of thought
    return f"{task}_{split}.jsonl" if task == "grounding" else f"{task}_{split}_{style}.jsonl"


def generate_vsp(
    task: str,
    levels,
    num_samples: int,
    split: str = "train",
    style: str = "cot",
    seed: int = 0,
    out_dir: str | Path = "data/vsp",
    exclude=(),
    overwrite: bool = False,
    max_hole_frac: float = 0.2,
    progress: bool = True,
    tile_px: int | None = None,
) -> Path:
    """Write `out_dir/<task>_<split>_<style>.jsonl` and its PNGs under `out_dir/images/`; return the JSONL path.

    Samples are spread evenly over `levels` (grid sides), one map per row and no map twice; maps in
    the `exclude` JSONL files are never generated. Reasoning outcomes A/B/C take turns, so they are
    balanced across the file. Same arguments, same seed: byte-identical output. The folder appears
    only once complete (written beside it, then renamed). Image paths are `./images/...`, relative
    to `out_dir`, which is the dataset root. `tile_px`: pixels per tile (default: the official 64 up to
    side 8); 28 gives one vision token per tile on Qwen-VL processors that keep the size.
    """
    if tile_px is not None and not 8 <= tile_px <= 256:
        raise MirageError(f"--tile-px {tile_px}: must be from 8 to 256")
    levels = _check_request(task, levels, num_samples, split, style, max_hole_frac)
    out_dir = check_output_dir(out_dir, overwrite, inputs={"--exclude": list(exclude or [])})
    excluded = load_map_descs(exclude)
    per_level = [num_samples // len(levels) + (i < num_samples % len(levels)) for i in range(len(levels))]

    status = contextlib.nullcontext()
    if progress:
        from rich.console import Console

        status = Console(stderr=True).status(f"sampling {num_samples} unique {task} maps ...")
    with status:
        plan_rows = _sample_all(task, split, seed, style, levels, per_level, excluded, max_hole_frac)

    with atomic_dir(out_dir, overwrite, command="data vsp") as tmp:
        rows = []
        for level, map_id, desc, plan, shown in _track(plan_rows, progress, f"rendering {task} {split} maps"):
            folder = f"images/level{level}"
            (tmp / folder).mkdir(parents=True, exist_ok=True)
            image = f"{folder}/{map_id}.png"
            render_map(desc, tile_px=tile_px).save(tmp / image)
            helper = None
            if split == "train" and task != "grounding":
                if task == "planning":
                    helper = f"{folder}/{map_id}_path.png"
                    render_map(desc, path=shortest_path(desc), tile_px=tile_px).save(tmp / helper)
                else:
                    helper = f"{folder}/{map_id}_step{shown}.png"
                    cells = walk(desc, plan)
                    render_map(desc, agent=cells[shown], facing=plan[shown - 1], tile_px=tile_px).save(
                        tmp / helper
                    )
            row_style = style if split == "train" else None
            helper_path = f"./{helper}" if helper else None
            if task == "planning":
                row = planning_row(desc, map_id, f"./{image}", row_style, helper_path)
            elif task == "grounding":
                row = grounding_row(desc, map_id, f"./{image}", row_style)
            else:
                row = reasoning_row(desc, map_id, plan, f"./{image}", row_style, helper_path, shown)
            rows.append(row | {"level": level})
        write_jsonl(tmp / output_name(task, split, style), rows)
    return out_dir / output_name(task, split, style)


def _sample_all(task, split, seed, style, levels, per_level, excluded, max_hole_frac) -> list[tuple]:
    """(level, map_id, desc, plan, shown) for every row, level after level."""
    plan_rows, index = [], 0
    for level, count in zip(levels, per_level):
        rng = random.Random(f"mirage-vsp:{task}:{split}:{seed}:{level}")  # train and test differ
        for i, (desc, plan) in enumerate(
            _sample_level(task, level, count, index, rng, excluded, max_hole_frac)
        ):
            shown = 0
            if plan is not None:
                made = len(walk(desc, plan)) - 1
                shown = made if style == "direct" else rng.randint(1, made)
            plan_rows.append((level, str(i), desc, plan, shown))
        index += count
    return plan_rows


def _track(items, enabled: bool, description: str):
    if not enabled:
        return items
    from rich.progress import track

    return track(items, description=description, transient=True)
