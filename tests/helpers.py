"""Helpers shared across test modules: running a recipe's `main` in-process, as its `__main__` does."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def recipe_main(name: str):
    """`main(script_args, training_args, model_args)` of `recipes/<name>.py` (what runs after TrlParser)."""
    path = REPO / "recipes" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main
