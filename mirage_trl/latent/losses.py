"""The losses of Mirage training, one function each, found by name like the poolings of `latent.targets`:

* `text_cross_entropy`: next-token cross-entropy over the trained positions (stages 1 and 2), with the sums
  TRL's SFT trainer logs from the same logits;
* the latent losses (`LATENT_LOSSES`), how stage 1 supervises the hidden state h[t-1] before each latent slot
  t against the slot's target e[t]: `cosine`, the paper's mean of 1 - cos(h[t-1], e[t]); `contrastive`, an
  InfoNCE loss in which each prediction must pick its own target against the other rows' targets (targets
  that differ little between maps are met by their mean direction under `cosine`, not under `contrastive`);
* `variance_covariance`, a VICReg-style regulariser across a batch's predictions against their collapse
  into one vector (`latent_variance_weight`).

A latent loss takes (predicted, targets, rows, temperature): predictions and targets (slots, D), the batch row
of each slot, and the contrastive temperature; it returns (loss, per-slot cosine), the cosine being what the
trainers log as `latent_cos` whatever the loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from trl.trainer.utils import entropy_from_logits  # TRL's own, chunked: no second vocab-size copy

from ..models.families import output_logits
from .collator import IGNORE_INDEX


def text_cross_entropy(
    model, hidden: torch.Tensor, labels: torch.Tensor, stats: dict | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token CE over trained positions, and their count (logits only where needed).

    `stats`: filled with the sums TRL's SFTTrainer logs from the same logits (top-1 hits and entropy over
    the trained positions), so Mirage runs keep `mean_token_accuracy` and `entropy`."""
    mask = labels[:, 1:] != IGNORE_INDEX
    h = hidden[:, :-1][mask]
    logits = output_logits(model, h).float()
    target = labels[:, 1:][mask]
    ce_sum = F.cross_entropy(logits, target, reduction="sum")
    if stats is not None:
        with torch.no_grad():
            stats["correct"] = (logits.detach().argmax(-1) == target).sum()
            stats["entropy"] = entropy_from_logits(logits.detach()).sum()
    return ce_sum, mask.sum()


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity, in float32 whatever the inputs' precision."""
    return F.cosine_similarity(a.float(), b.float(), dim=-1)


def cosine_loss(predicted, targets, rows=None, temperature=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's latent loss: mean over slots of 1 - cos(h[t-1], e[t])."""
    cos = cosine(predicted, targets)
    return (1.0 - cos).mean(), cos


def contrastive_loss(predicted, targets, rows, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE over the batch: slot i's prediction scores every target by cosine / `temperature` and must pick
    its own; the other slots of its own row are left out (they stand for the same helper image), so the
    negatives are the other rows' targets. A batch with one row gives no negatives and a zero loss."""
    p = F.normalize(predicted.float(), dim=-1)
    t = F.normalize(targets.float(), dim=-1)
    logits = p @ t.T / temperature
    own = torch.eye(len(rows), dtype=torch.bool, device=logits.device)
    logits = logits.masked_fill((rows[:, None] == rows[None, :]) & ~own, float("-inf"))
    loss = F.cross_entropy(logits, torch.arange(len(rows), device=logits.device))
    return loss, (p * t).sum(-1)


def variance_covariance(predicted: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """VICReg's variance and covariance terms over a batch's predictions (slots, D): a hinge that keeps each
    dimension's standard deviation at 1 or more, plus the squared off-diagonal covariances divided by D.
    Zero for fewer than two predictions."""
    x = predicted.float()
    n, d = x.shape
    if n < 2:
        return x.sum() * 0.0
    x = x - x.mean(dim=0)
    variance = F.relu(1.0 - torch.sqrt(x.var(dim=0) + eps)).mean()
    cov = x.T @ x / (n - 1)
    covariance = (cov.pow(2).sum() - cov.diagonal().pow(2).sum()) / d
    return variance + covariance


LATENT_LOSSES = {"cosine": cosine_loss, "contrastive": contrastive_loss}
