"""Cached stage-1 targets: the same losses as encoding helper images every step, and a second run
reuses the Arrow cache instead of running the vision tower."""

import torch

from mirage_trl.latent.collator import MirageDataCollator
from mirage_trl.latent.targets import helper_latent_targets, precompute_latent_targets
from mirage_trl.models.prepare import add_latent_tokens
from mirage_trl.models.tiny import build_tiny_model


def _rows(tmp_path):
    from mirage_trl.data.reference import load_reference_jsonl
    from mirage_trl.data.vsp import generate_vsp

    out = generate_vsp(
        "planning", [3], 4, split="train", style="cot", seed=0, out_dir=tmp_path / "d", progress=False
    )
    return load_reference_jsonl(out)


def test_cached_targets_equal_fresh_targets_and_are_reused(tmp_path):
    model, processor = build_tiny_model()
    tokens = add_latent_tokens(processor, model, 4)
    rows = _rows(tmp_path)
    cached = precompute_latent_targets(rows, model, processor, 4, "even", cache_dir=tmp_path / "cache")
    fresh = MirageDataCollator(processor, tokens)([rows[i] for i in range(4)])
    from_cache = MirageDataCollator(processor, tokens)([cached[i] for i in range(4)])
    assert "helper_pixel_values" not in from_cache
    helpers = {"pixel_values": fresh["helper_pixel_values"], "image_grid_thw": fresh["helper_image_grid_thw"]}
    expected = helper_latent_targets(model, helpers, 4, "even")
    torch.testing.assert_close(from_cache["latent_targets"], expected, rtol=1e-5, atol=1e-6)
    assert from_cache["latent_targets"].shape[0] == int(fresh["latent_mask"].sum())

    # A second run finds the Arrow file: the vision tower is not called again.
    calls = []
    handle = model.model.visual.register_forward_hook(lambda *a: calls.append(1))
    again = precompute_latent_targets(rows, model, processor, 4, "even", cache_dir=tmp_path / "cache")
    handle.remove()
    assert calls == []
    assert again["latent_targets"] == cached["latent_targets"]
    # Different pooling -> different cache entry, different targets.
    other = precompute_latent_targets(
        rows, model, processor, 4, "drop_remainder", cache_dir=tmp_path / "cache"
    )
    assert other._fingerprint != cached._fingerprint
