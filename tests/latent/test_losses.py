"""The losses of `latent.losses` against plain per-row references (values and gradients)."""

from __future__ import annotations

import math

import pytest
import torch

from mirage_trl.errors import MirageError
from mirage_trl.latent.losses import (
    LATENT_LOSSES,
    contrastive_loss,
    cosine_loss,
    text_cross_entropy,
    variance_covariance,
)
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


def test_latent_losses_are_found_by_name():
    """The names the `--latent_loss` flag takes (an unknown one is refused by the config, test_sft.py)."""
    assert LATENT_LOSSES == {"cosine": cosine_loss, "contrastive": contrastive_loss}


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


@pytest.mark.parametrize("chunk_size", [1, 3, 0])
def test_chunked_cross_entropy_equals_the_per_position_reference_with_gradients(chunk_size):
    """Chunked logits (each chunk recomputed in the backward) give the loss, the TRL metrics and the gradients
    of hidden states and LM head that a per-position loop gives; 0: one chunk."""
    model, _ = build_tiny_model()
    model.lm_head.weight.requires_grad_(True)
    torch.manual_seed(1)
    hidden = torch.randn(2, 6, model.config.text_config.hidden_size, requires_grad=True)
    labels = torch.tensor([[-100, 5, 7, -100, 9, 11], [-100, -100, 3, 4, 5, -100]])
    stats: dict = {}
    ce_sum, n = text_cross_entropy(model, hidden, labels, stats, chunk_size=chunk_size)
    ce_sum.backward()
    got = (hidden.grad.clone(), model.lm_head.weight.grad.clone())
    hidden.grad, model.lm_head.weight.grad = None, None
    total, hits, entropy = 0.0, 0, 0.0
    for b in range(2):
        for t in range(5):
            if labels[b, t + 1] != -100:
                logp = torch.log_softmax(model.lm_head(hidden[b, t]).float(), -1)
                total = total - logp[labels[b, t + 1]]
                hits += int(logp.argmax() == labels[b, t + 1])
                entropy -= float((logp.exp() * logp).sum().detach())
    total.backward()
    assert int(n) == 7
    assert ce_sum.item() == pytest.approx(total.item(), rel=1e-6)
    assert int(stats["correct"]) == hits
    assert float(stats["entropy"]) == pytest.approx(entropy, rel=1e-5)
    assert torch.allclose(got[0], hidden.grad, atol=1e-6)
    assert torch.allclose(got[1], model.lm_head.weight.grad, atol=1e-6)


def test_chunked_cross_entropy_keeps_no_logits_for_the_backward():
    """What the backward keeps: with chunks, no tensor of vocabulary width (the logits, their softmax) is saved;
    in one chunk, at least one (positions x vocabulary) is."""
    model, _ = build_tiny_model()
    vocab = model.lm_head.weight.shape[0]
    torch.manual_seed(1)
    hidden = torch.randn(2, 40, model.config.text_config.hidden_size, requires_grad=True)
    labels = torch.randint(0, vocab, (2, 40))

    def saved_widths(chunk_size):
        widths = []

        def pack(t):
            widths.append(t.shape[-1] if t.ndim == 2 and t.shape[0] > 1 else 0)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            text_cross_entropy(model, hidden, labels, chunk_size=chunk_size)
        return widths

    assert vocab in saved_widths(0)
    assert vocab not in saved_widths(8)


def test_contrastive_loss_picks_each_target_against_the_other_rows_with_its_gradient():
    """Per slot, by hand: -log softmax over {its own target} + {the targets of other rows}, cos / T."""
    torch.manual_seed(0)
    rows = torch.tensor([0, 0, 1, 1, 1, 3])  # row 2 has no slot; rows 0 and 1 have several
    predicted = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    targets = torch.randn(6, 8, dtype=torch.float64)
    loss, cos = contrastive_loss(predicted, targets, rows, temperature=0.2)
    loss.backward()
    ref_pred = predicted.detach().clone().requires_grad_(True)
    terms = []
    for i in range(6):
        p = ref_pred[i] / ref_pred[i].norm()
        candidates = [j for j in range(6) if j == i or rows[j] != rows[i]]
        scores = torch.stack([(p * targets[j] / targets[j].norm()).sum() / 0.2 for j in candidates])
        terms.append(-(scores[candidates.index(i)] - torch.logsumexp(scores, 0)))
    ref = torch.stack(terms).mean()
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    assert torch.allclose(predicted.grad, ref_pred.grad, rtol=1e-5, atol=1e-7)
    assert torch.allclose(cos.double(), torch.nn.functional.cosine_similarity(predicted, targets), atol=1e-6)
    one_row, _ = contrastive_loss(predicted[:2], targets[:2], rows[:2], temperature=0.2)
    assert one_row.item() == 0.0  # no other row: nothing to tell apart


def test_variance_covariance_by_hand():
    torch.manual_seed(1)
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    value = variance_covariance(x)
    value.backward()
    ref_x = x.detach().clone().requires_grad_(True)
    mean = [sum(ref_x[i, d] for i in range(5)) / 5 for d in range(3)]
    c = [[sum((ref_x[i, a] - mean[a]) * (ref_x[i, b] - mean[b]) for i in range(5)) / 4 for b in range(3)]
         for a in range(3)]  # fmt: skip
    hinge = sum(torch.clamp(1 - torch.sqrt(c[d][d] + 1e-4), min=0) for d in range(3)) / 3
    off = sum(c[a][b] ** 2 for a in range(3) for b in range(3) if a != b) / 3
    ref = hinge + off
    ref.backward()
    assert value.item() == pytest.approx(ref.item(), rel=1e-6)  # computed in float32, as in training
    assert torch.allclose(x.grad, ref_x.grad, rtol=1e-5, atol=1e-7)
    assert variance_covariance(x[:1]).item() == 0.0


def test_the_settings_know_every_latent_loss():
    """A model's settings record its latent loss by name: the names they accept are the losses that exist."""
    from mirage_trl.latent.losses import LATENT_LOSSES
    from mirage_trl.models.settings import LATENT_LOSS_NAMES

    assert tuple(LATENT_LOSSES) == LATENT_LOSS_NAMES


def test_the_settings_know_every_latent_target():
    """Likewise the stage-1 target kinds (`latent.targets`), which a bad settings file names in one line."""
    from mirage_trl.latent.targets import LATENT_TARGETS
    from mirage_trl.models.settings import LATENT_TARGET_NAMES, MirageSettings

    assert LATENT_TARGETS == LATENT_TARGET_NAMES
    with pytest.raises(MirageError, match=r"^x.json: latent_target 'mean': choose one of pooled, centred"):
        MirageSettings.from_dict({"latent_size": 2, "latent_target": "mean"}, "x.json")
    with pytest.raises(MirageError, match=r"^x.json: latent_only_backprop must be true or false, got 'no'$"):
        MirageSettings.from_dict({"latent_size": 2, "latent_only_backprop": "no"}, "x.json")
