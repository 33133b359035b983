"""Shared test fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

# `../shared` beside the repository: reference data and docs that do not live in the repo.
SHARED_DIR = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED_DIR.is_dir():
        pytest.skip(f"reference data not available: {SHARED_DIR} is absent (it sits beside the repository)")
    return SHARED_DIR


@pytest.fixture(scope="session")
def official_data(shared_dir) -> Path:
    """The `data/` folder of the reference samples (`mirage_official/data`)."""
    path = shared_dir / "data" / "mirage_official" / "data"
    if not path.is_dir():
        pytest.skip(f"reference data not available: {path} is absent")
    return path


@pytest.fixture(scope="session")
def tiny_run_inputs(tmp_path_factory):
    """A random tiny Qwen2.5-VL saved like a checkpoint and 4 generated VSP planning rows (level 3, CoT):
    what the recipe, checkpoint and output tests train on. Returns (model folder, JSONL path)."""
    from mirage_trl.data.vsp import generate_vsp
    from mirage_trl.models.tiny import save_tiny_model

    root = tmp_path_factory.mktemp("tiny_run_inputs")
    save_tiny_model(root / "tiny")
    data = generate_vsp(
        "planning", [3], 4, split="train", style="cot", seed=0, out_dir=root / "data", progress=False
    )
    return root / "tiny", data
