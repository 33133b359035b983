"""Draw VSP (FrozenLake) maps the way the official Mirage images were drawn.

The official images are gymnasium 0.29.1's FrozenLake `rgb_array` frames: every tile is ice,
then hole / goal gift / stool (start) on top, then a 1 px (180, 200, 230) grid line, then the
elf facing its last move (down before any move) or a cracked hole if it fell in. Sprites are
32 px PNGs scaled with nearest neighbour to 64 px tiles (512 // side beyond side 8). This
module composes the same PNGs with PIL, without importing gymnasium's env or pygame; the
result matches the 400 official test images to about 1e-4 grey levels.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

from ..errors import MirageError

HOLE, ICE, START, GOAL = -1, 0, 1, 2
GRID_LINE = (180, 200, 230)
ARROW = (255, 0, 0)
ELF_SPRITE = {"L": "elf_left", "D": "elf_down", "R": "elf_right", "U": "elf_up"}
_DELTA = {"L": (0, -1), "R": (0, 1), "U": (-1, 0), "D": (1, 0)}


def tile_size(side: int) -> int:
    """Pixels per tile: gymnasium's window is min(64 * side, 512) wide."""
    return min(64 * side, 512) // side


def sprite_dir() -> Path:
    """gymnasium's FrozenLake sprite folder, found without importing gymnasium (pygame stays out)."""
    spec = importlib.util.find_spec("gymnasium")
    if spec is None or not spec.submodule_search_locations:
        raise MirageError(
            "rendering VSP maps needs gymnasium 0.29.1's sprites: pip install gymnasium==0.29.1"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "envs" / "toy_text" / "img"
    if not (folder / "ice.png").is_file():
        raise MirageError(f"{folder}: gymnasium's FrozenLake sprites are missing (need gymnasium 0.29.1)")
    return folder


@functools.lru_cache(maxsize=64)
def _sprite(name: str, size: int):
    from PIL import Image

    with Image.open(sprite_dir() / f"{name}.png") as im:
        # pygame.transform.scale is nearest neighbour: the 32 px pixel art stays sharp.
        return im.convert("RGBA").resize((size, size), Image.NEAREST)


def _cells(map_desc, value):
    return [(r, c) for r, row in enumerate(map_desc) for c, v in enumerate(row) if v == value]


def _draw_path(image, map_desc, start, path: str, size: int) -> None:
    """Red arrows from tile centre to tile centre along `path` (no-op moves skipped, stops at a hole)."""
    from PIL import ImageDraw

    draw = ImageDraw.Draw(image)
    side = len(map_desc)
    width = max(2, size // 12)
    head = max(5, size // 5)
    r, c = start
    for move in path:
        if move not in _DELTA:
            raise MirageError(f"path: {move!r} is not a move (use L, R, U, D)")
        dr, dc = _DELTA[move]
        nr, nc = r + dr, c + dc
        if not (0 <= nr < side and 0 <= nc < side):
            continue
        x0, y0 = c * size + size // 2, r * size + size // 2
        x1, y1 = nc * size + size // 2, nr * size + size // 2
        # Stop the shaft short of the centre so the head's tip lands there.
        tx, ty = x1 - dc * head, y1 - dr * head
        draw.line([(x0, y0), (tx, ty)], fill=ARROW, width=width)
        px, py = -dr * head * 0.6, dc * head * 0.6  # perpendicular half-width of the head
        draw.polygon([(x1, y1), (tx + px, ty + py), (tx - px, ty - py)], fill=ARROW)
        r, c = nr, nc
        if map_desc[r][c] == HOLE:
            break


def render_map(
    map_desc,
    agent=None,
    path: str | None = None,
    show_start: bool | None = None,
    facing: str = "D",
    tile_px: int | None = None,
):
    """Render a map as an RGB `PIL.Image.Image` (64 px tiles up to side 8, or `tile_px` px tiles).

    agent=None: the elf on the start, no stool (the official input images).
    agent=(row, col): the elf there facing `facing` (the last move, L/R/U/D) and a stool on the
    start, or a cracked hole if (row, col) is a hole (the official step images).
    path="RRD...": the start map with the path drawn as red arrows (the planning helper image).
    show_start forces the stool on or off (default: on only when the agent has moved).
    """
    from PIL import Image, ImageDraw

    side = len(map_desc)
    starts = _cells(map_desc, START)
    if side < 1 or any(len(row) != side for row in map_desc) or len(starts) != 1:
        raise MirageError("map_desc: need a square grid with exactly one start cell (1)")
    if facing not in ELF_SPRITE:
        raise MirageError(f"facing: {facing!r} is not a move (use L, R, U, D)")
    size = tile_px or tile_size(side)
    start = starts[0]
    if agent is not None:
        agent = tuple(agent)
        if not (0 <= agent[0] < side and 0 <= agent[1] < side):
            raise MirageError(f"agent: {agent} is off the {side}x{side} grid")
    if show_start is None:
        show_start = agent is not None
    image = Image.new("RGBA", (side * size, side * size), (0, 0, 0, 255))
    draw = ImageDraw.Draw(image)
    on_top = {HOLE: "hole", GOAL: "goal", START: "stool" if show_start else None}
    for r, row in enumerate(map_desc):
        for c, value in enumerate(row):
            xy = (c * size, r * size)
            image.alpha_composite(_sprite("ice", size), xy)
            if on_top.get(value):
                image.alpha_composite(_sprite(on_top[value], size), xy)
            draw.rectangle([xy, (xy[0] + size - 1, xy[1] + size - 1)], outline=GRID_LINE, width=1)
    r, c = agent if agent is not None else start
    fell = map_desc[r][c] == HOLE
    image.alpha_composite(_sprite("cracked_hole" if fell else ELF_SPRITE[facing], size), (c * size, r * size))
    if path:
        _draw_path(image, map_desc, start, path, size)
    return image.convert("RGB")
