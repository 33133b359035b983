"""User-supplied benchmarks (SAT, COMT) in the reference JSONL format, and the helper-image check per stage.

SAT's helper images come from a video model and COMT's from its own annotations; mirage-trl
cannot generate them, so users bring the JSONL and images and load them here.
"""

from __future__ import annotations

import os

from ..errors import MirageError
from .reference import load_reference_jsonl

# Stage 1 supervises latents with helper-image features; stages 2 and 3 use self-generated latents.
STAGES_NEEDING_HELPERS = (1,)
STAGES = (1, 2, 3)


def load_sat(path: str | os.PathLike, root: str | os.PathLike | None = None, check_images: bool = True):
    """SAT (synthetic or real) rows in the reference format, as a `datasets.Dataset`."""
    return load_reference_jsonl(path, root=root, benchmark="sat", check_images=check_images)


def load_comt(path: str | os.PathLike, root: str | os.PathLike | None = None, check_images: bool = True):
    """COMT rows in the reference format, as a `datasets.Dataset`."""
    return load_reference_jsonl(path, root=root, benchmark="comt", check_images=check_images)


def require_helper_images(dataset, stage: int) -> None:
    """Raise naming the first row without helper images when `stage` needs them (stage 1)."""
    if stage not in STAGES:
        raise MirageError(f"unknown stage {stage!r}; valid: {', '.join(map(str, STAGES))}")
    if stage not in STAGES_NEEDING_HELPERS:
        return
    # A Dataset: read one Arrow column instead of decoding every row; a list of row dicts works too.
    helpers = [r["helper_images"] for r in dataset] if isinstance(dataset, list) else dataset["helper_images"]
    for i, paths in enumerate(helpers):
        if not paths:
            source = dataset[i]["source"]
            raise MirageError(
                f"{source}: stage {stage} needs helper images (<output_image> markers with image_output), "
                "this row has none"
            )
