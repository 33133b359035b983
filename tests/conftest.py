"""Shared test fixtures."""

from __future__ import annotations

import json
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


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads; one thread keeps a file fast on a shared 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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


# ---------------------------------------------------------------- the bad-input matrix (docs/reliability.md)
@pytest.fixture(scope="session")
def env(tmp_path_factory):
    """Tiny models on disk (plain VL, Mirage k=2, text-only), 4 generated VSP rows with their images."""

    from mirage_trl.data.vsp import generate_vsp
    from mirage_trl.models.prepare import add_latent_tokens
    from mirage_trl.models.tiny import build_tiny_model, save_tiny_model

    root = tmp_path_factory.mktemp("reliability")
    base = save_tiny_model(root / "base")  # a vision-language model, but not a Mirage one
    model, processor = build_tiny_model(seed=0)
    add_latent_tokens(processor, model, latent_size=2)
    mirage = root / "mirage"
    model.save_pretrained(mirage)
    processor.save_pretrained(mirage)
    # A model without a vision tower, with the latent tokens and settings of a Mirage model.
    from helpers import text_only_model

    text_only, tok = text_only_model()
    add_latent_tokens(tok, text_only, latent_size=2)
    text_only.save_pretrained(root / "text-only")
    tok.save_pretrained(root / "text-only")

    data = generate_vsp(
        "planning", [3], 4, split="train", style="cot", seed=0, out_dir=root / "data", progress=False
    )
    objs = [json.loads(line) for line in data.read_text().splitlines()]
    for o in objs:  # absolute image paths, so bad files can live anywhere
        o["image_input"] = str((data.parent / o["image_input"]).resolve())
        o["image_output"] = str((data.parent / o["image_output"]).resolve())
    return dict(
        root=root,
        base=base,
        mirage=mirage,
        text_only=root / "text-only",
        data=data,
        objs=objs,
        processor=processor,
    )


@pytest.fixture(scope="session")
def rows(env):
    from mirage_trl.data.reference import load_reference_jsonl

    return load_reference_jsonl(env["data"])


@pytest.fixture(scope="session")
def guard_rows(rows):
    return rows.select(range(2))
