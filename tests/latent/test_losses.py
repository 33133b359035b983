"""The losses of `latent.losses` against plain per-row references (values and gradients)."""

from __future__ import annotations

import math

import pytest
import torch

from mirage_trl.errors import MirageError
from mirage_trl.latent.losses import LATENT_LOSSES, cosine_loss, latent_loss_fn, text_cross_entropy
from mirage_trl.models.tiny import build_tiny_model


def test_cosine_loss_is_the_mean_of_one_minus_cos_per_slot_with_its_gradient():
    torch.manual_seed(0)
    predicted = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    targets = torch.randn(5, 8, dtype=torch.float64)
    loss, cos = cosine_loss(predicted, targets)
    loss.backward()
    ref_pred = predicted.detach().clone().requires_grad_(True)
    terms = []
    for p, t in zip(ref_pred, targets):  # one slot at a time: dot / (|p| |t|)
        terms.append(1.0 - (p * t).sum() / (p.norm() * t.norm()))
    ref = sum(terms) / len(terms)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    assert torch.allclose(cos.double(), torch.stack([1.0 - x for x in terms]).detach(), atol=1e-6)
    assert torch.allclose(predicted.grad, ref_pred.grad, rtol=1e-5, atol=1e-7)


def test_latent_losses_are_found_by_name_and_an_unknown_one_is_refused():
    assert latent_loss_fn("cosine") is cosine_loss
    assert list(LATENT_LOSSES) == ["cosine"]
    with pytest.raises(MirageError, match=r"^unknown latent loss 'l2'; choose one of cosine$"):
        latent_loss_fn("l2")


def test_text_cross_entropy_sums_the_trained_positions():
    model, _ = build_tiny_model()
    torch.manual_seed(1)
    hidden = torch.randn(2, 6, model.config.text_config.hidden_size)
    labels = torch.tensor([[-100, 5, 7, -100, 9, 11], [-100, -100, 3, 4, 5, -100]])
    stats: dict = {}
    ce_sum, n = text_cross_entropy(model, hidden, labels, stats)
    total, count, hits = 0.0, 0, 0
    for b in range(2):  # position t predicts the label at t + 1
        for t in range(5):
            if labels[b, t + 1] != -100:
                logits = model.lm_head(hidden[b, t]).double()
                total -= torch.log_softmax(logits, -1)[labels[b, t + 1]].item()
                hits += int(logits.argmax() == labels[b, t + 1])
                count += 1
    assert int(n) == count == 7
    assert ce_sum.item() == pytest.approx(total, rel=1e-5)
    assert int(stats["correct"]) == hits
    assert math.isfinite(float(stats["entropy"]))
