"""Jigsaw (BLINK-style) data generator: which candidate patch fills the hole in the reference image?

Per sample: cut a square hole (flat gray) out of a source image, offer the true patch and a
distractor patch (elsewhere in the same image or from another one) as candidates A/B in random
order. Inputs: [reference with hole, candidate A, candidate B]; helper image: the reference
with the correct candidate pasted back in. Output: reference-format JSONL (`jigsaw.jsonl`) and
PNGs under `images/`, written atomically; the same seed gives the same files.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from ..errors import MirageError
from ..folders import atomic_dir
from ..io import write_jsonl
from .images import load_image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
HOLE_COLOR = (128, 128, 128)
JSONL_NAME = "jigsaw.jsonl"
MAX_PATCH_FRAC = 1 / 3  # at most a third of the side, so a non-overlapping distractor always fits

PROMPT = (
    "\nGiven the first image with a square region missing (filled with gray), which of the two candidate "
    "patches is the missing part? Imagine each candidate placed in the missing spot and compare its edges "
    "and content with the surroundings.\n\n"
    "Reference image: <image>\nCandidate A: <image>\nCandidate B: <image>\n\n"
    "Answer with A or B.\n You FIRST think about the reasoning process as an internal monologue and then "
    "provide the final answer. The reasoning process MUST BE enclosed within <think> </think> tags. "
    "The final answer MUST BE put in \\boxed{}."
)


def _completion(letter: str, box: tuple[int, int, int, int]) -> str:
    x0, y0, x1, y1 = box
    return (
        f"<think> The gray square spans x {x0}-{x1}, y {y0}-{y1}; the missing part must continue the content "
        f"around it. Let me picture candidate {letter} pasted into the gap. </think><output_image>"
        f"<think> With candidate {letter} in place, its edges and content line up with the surroundings, "
        f"so it is the missing part. </think>The answer is \\boxed{{{letter}}}."
    )


def find_images(folder: str | os.PathLike) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise MirageError(f"--images: folder not found: {folder}")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise MirageError(f"--images: no {'/'.join(IMAGE_SUFFIXES)} images in {folder}")
    return files


def _load(path: Path, max_side: int):
    im = load_image(path)
    if max(im.size) > max_side:
        scale = max_side / max(im.size)
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))))
    return im


def _free_starts(lo: int, hi: int, taken: int, side: int) -> list[range]:
    """Start positions in [lo, hi] whose [start, start+side) does not overlap [taken, taken+side)."""
    return [r for r in (range(lo, min(hi, taken - side) + 1), range(max(lo, taken + side), hi + 1)) if len(r)]


def make_sample(ref, other, rng: random.Random, patch_frac: float = 0.25) -> dict:
    """One puzzle from `ref` (the distractor comes from `other` when given and big enough, else from `ref`).

    Returns `reference` (with hole), `candidates` [A, B], `helper`, `answer` letter, `box` of the hole.
    """
    side = max(4, round(min(ref.size) * patch_frac))
    if side * 3 > min(ref.size):
        raise MirageError(f"image too small for a jigsaw patch ({ref.width}x{ref.height}, patch side {side})")
    x, y = rng.randint(0, ref.width - side), rng.randint(0, ref.height - side)
    box = (x, y, x + side, y + side)
    true_patch = ref.crop(box)

    distractor = None
    for _ in range(10):
        if other is not None and other.width >= side and other.height >= side and rng.random() < 0.5:
            dx, dy = rng.randint(0, other.width - side), rng.randint(0, other.height - side)
            cand = other.crop((dx, dy, dx + side, dy + side))
        else:
            # Same image, a patch beside the hole along x (width >= 3 sides, so there is always room).
            dx = rng.choice(rng.choice(_free_starts(0, ref.width - side, x, side)))
            dy = rng.randint(0, ref.height - side)
            cand = ref.crop((dx, dy, dx + side, dy + side))
        if cand.tobytes() != true_patch.tobytes():
            distractor = cand
            break
    if distractor is None:
        raise MirageError("no distractor patch differs from the true patch (is the image one flat colour?)")

    with_hole = ref.copy()
    with_hole.paste(HOLE_COLOR, box)
    answer = "A" if rng.random() < 0.5 else "B"
    candidates = [true_patch, distractor] if answer == "A" else [distractor, true_patch]
    helper = with_hole.copy()
    helper.paste(true_patch, box[:2])
    return {"reference": with_hole, "candidates": candidates, "helper": helper, "answer": answer, "box": box}


def generate_jigsaw(
    images: str | os.PathLike,
    num_samples: int,
    seed: int,
    out: str | os.PathLike,
    patch_frac: float = 0.25,
    max_side: int = 512,
    overwrite: bool = False,
) -> Path:
    """Write `num_samples` puzzles from the images under `images` to `out`; returns the JSONL path."""
    if num_samples < 1:
        raise MirageError(f"--num-samples: must be at least 1, got {num_samples}")
    if not 0 < patch_frac <= MAX_PATCH_FRAC:
        raise MirageError(f"--patch-frac: must be in (0, {MAX_PATCH_FRAC:.3f}], got {patch_frac}")
    if max_side < 12:
        raise MirageError(f"--max-side: must be at least 12, got {max_side}")
    folder = Path(images)
    files = find_images(folder)
    rng = random.Random(seed)
    order = files[:]
    rng.shuffle(order)
    cache: dict[Path, object] = {}

    def get(path):
        if path not in cache:
            if len(cache) > 64:  # bound memory on large folders
                cache.clear()
            cache[path] = _load(path, max_side)
        return cache[path]

    rows = []
    with atomic_dir(out, overwrite=overwrite, command="data jigsaw") as tmp:
        for i in range(num_samples):
            path = order[i % len(order)]
            others = [p for p in files if p != path]
            other = get(rng.choice(others)) if others else None
            ref = get(path)
            try:
                sample = make_sample(ref, other, rng, patch_frac)
            except MirageError as e:
                raise MirageError(f"{path}: {e}") from None
            rel = Path("images") / f"{i:06d}"
            (tmp / rel).mkdir(parents=True)
            names = ["reference.png", "candidate_a.png", "candidate_b.png"]
            for name, im in zip(names, [sample["reference"], *sample["candidates"]]):
                im.save(tmp / rel / name)
            sample["helper"].save(tmp / rel / "helper.png")
            rows.append(
                {
                    "text_input": PROMPT,
                    "image_input": [f"{rel.as_posix()}/{name}" for name in names],
                    "text_output": _completion(sample["answer"], sample["box"]),
                    "image_output": f"{rel.as_posix()}/helper.png",
                    "answer": sample["answer"],
                    "hole_box": list(sample["box"]),
                    "source_image": path.relative_to(folder).as_posix(),
                }
            )
        write_jsonl(tmp / JSONL_NAME, rows)
    return Path(out) / JSONL_NAME
