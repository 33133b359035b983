"""Latent analysis: cosine figures against a hand computation; `mirage-trl analyze-latents` on a tiny model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from mirage_trl.analysis import pca_2d, space_stats
from mirage_trl.cli import main


def test_space_stats_by_hand():
    lat = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    space = torch.tensor([[1.0, 1.0], [0.0, -3.0], [2.0, 0.0]])
    s = space_stats(lat, space, chunk=2)  # chunked max across two chunks
    # latent 0: best is (2, 0) -> 1; latent 1: best is (1, 1) -> 1/sqrt2.
    assert s["nn_cosine"] == pytest.approx((1 + 1 / math.sqrt(2)) / 2)
    # centroid (1, -2/3): cos with (1, 0) and (0, 1).
    c = torch.tensor([1.0, -2 / 3])
    cos0, cos1 = 1 / c.norm(), (-2 / 3) / c.norm()
    assert s["centroid_cosine"] == pytest.approx(float(cos0 + cos1) / 2)
    lc = torch.tensor([0.5, 1.0])  # latent centroid
    assert s["latent_centroid_cosine"] == pytest.approx(float(lc @ c / (lc.norm() * c.norm())))
    proj = pca_2d({"a": space, "b": lat})
    assert proj["a"].shape == (3, 2) and proj["b"].shape == (2, 2)


@pytest.fixture
def triggered_model(tmp_path):
    """A tiny Mirage model that emits <|latent_start|> where its greedy pick for row 0's first step would be."""
    from mirage_trl.evaluation import prompt_encoder
    from mirage_trl.models.prepare import add_latent_tokens
    from mirage_trl.models.tiny import build_tiny_model

    for name, seed in (("in.png", 0), ("help.png", 1)):
        Image.fromarray((np.random.RandomState(seed).rand(56, 56, 3) * 255).astype("uint8")).save(
            tmp_path / name
        )
    row = {"text_input": "<image>Plan.", "image_input": "in.png", "text_output": "<output_image> \\boxed{R}",
           "image_output": "help.png", "map_desc": [[1, 2]]}  # fmt: skip
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps(row) + "\n" + json.dumps({**row, "text_input": "<image>Plan it now."}) + "\n")

    model, processor = build_tiny_model(seed=0)
    lt = add_latent_tokens(processor, model, latent_size=2)
    from mirage_trl.data.reference import load_rows

    rows = load_rows(data, root=tmp_path, benchmark="vsp_planning")
    enc = prompt_encoder(processor)
    batch = enc.prompt_batch(rows)
    with torch.no_grad():
        logits = model(**batch).logits[0, -1]
        first = int(logits.argmax())
        head = model.get_output_embeddings().weight
        head[lt.start_id] = head[first] * (1.05 if logits[first] > 0 else 0.95)
    out = tmp_path / "model"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out, data, tmp_path


def test_cli_analyze_latents(triggered_model, capsys):
    model_dir, data, root = triggered_model
    out = root / "analysis"
    rc = main(["analyze-latents", "--model", str(model_dir), "--data", str(data), "--root", str(root),
               "--max-new-tokens", "8", "--greedy", "--out", str(out)])  # fmt: skip
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    stats = json.loads((out / "analysis.json").read_text())
    assert stats["num_latents"] >= 2 and stats["num_latents"] % 2 == 0 and stats["num_images"] == 4
    for space in ("image features", "text embeddings"):
        for key in ("nn_cosine", "centroid_cosine", "latent_centroid_cosine"):
            assert -1.0 <= stats[space][key] <= 1.0
    # Hand computation from the saved vectors and the model's embedding matrix.
    from safetensors.torch import load_file

    assert not (out / "vectors.pt").exists()  # no pickle written
    vec = load_file(str(out / "vectors.safetensors"))
    lat, img = vec["latents"].double(), vec["image_features"].double()
    assert lat.shape[0] == stats["num_latents"]
    from mirage_trl.models.load import load_model

    model, processor = load_model(model_dir)
    text = model.get_input_embeddings().weight.detach().double()[: len(processor.tokenizer)]
    text = text[text.norm(dim=-1) > 0]  # padding rows are left out
    assert stats["text embeddings"]["size"] == text.shape[0]
    for space, ref in (("image features", img), ("text embeddings", text)):
        nn = np.mean([max(float(torch.dot(a, b) / (a.norm() * b.norm())) for b in ref) for a in lat])
        assert stats[space]["nn_cosine"] == pytest.approx(nn, abs=1e-6)
        c = ref.mean(dim=0)
        cc = np.mean([float(torch.dot(a, c) / (a.norm() * c.norm())) for a in lat])
        assert stats[space]["centroid_cosine"] == pytest.approx(cc, abs=1e-6)
    png = Image.open(out / "projection.png")
    assert png.size[0] == 1200 and png.size[1] >= 640  # two matplotlib panels, 12 in x 6.4 in at 100 dpi
    assert "nearest-neighbour cos" in captured.out
