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
