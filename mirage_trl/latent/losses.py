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
from torch.utils.checkpoint import checkpoint
from trl.trainer.utils import entropy_from_logits  # TRL's own, chunked: no second vocab-size copy

from ..models.families import is_partitioned, output_logits
from .collator import IGNORE_INDEX

# Trained positions whose logits exist at once in the text cross-entropy: at a 152k vocabulary, 1024 positions are
# 0.6 GB of float32 logits (and as much again for their gradient), whatever the batch.
LOGITS_CHUNK_SIZE = 1024


def text_cross_entropy(
    model,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    stats: dict | None = None,
    chunk_size: int | None = LOGITS_CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token CE over trained positions, and their count (logits only where needed).

    The logits are computed `chunk_size` positions at a time, each chunk under activation checkpointing: the
    backward recomputes a chunk's logits from its hidden states instead of keeping every chunk's, so the
    (positions, vocabulary) matrix never exists whole (`None` or 0: one chunk). Under ZeRO-3 the LM head is
    called once whatever the size: each call gathers its weight, a collective that every rank must make
    equally often, and ranks hold different numbers of trained positions.

    `stats`: filled with the sums TRL's SFTTrainer logs from the same logits (top-1 hits and entropy over
    the trained positions), so Mirage runs keep `mean_token_accuracy` and `entropy`."""
    mask = labels[:, 1:] != IGNORE_INDEX
    # the trained positions once (one device-to-host wait, for their count), as flat indices into the (B, L)
    # layout: position t predicts the label at t + 1
    b, t = mask.nonzero(as_tuple=True)
    where = b * labels.shape[1] + t
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, where)
    target = labels.reshape(-1).index_select(0, where + 1)
    n = h.shape[0]
    if not chunk_size or n <= chunk_size or not torch.is_grad_enabled() or is_partitioned(model):
        chunk_size = max(n, 1)
    sums = []
    for start in range(0, n, chunk_size):
        args = (model, h[start : start + chunk_size], target[start : start + chunk_size], stats is not None)
        if chunk_size < n:
            sums.append(checkpoint(_chunk_cross_entropy, *args, use_reentrant=False))
        else:
            sums.append(_chunk_cross_entropy(*args))
    if not sums:  # no trained position: a zero that keeps the graph
        sums.append(_chunk_cross_entropy(model, h, target, stats is not None))
    ce_sum, correct, entropy = (torch.stack(parts).sum() for parts in zip(*sums))
    if stats is not None:
        stats["correct"], stats["entropy"] = correct, entropy
    return ce_sum, mask.sum()


def _chunk_cross_entropy(model, h, target, with_stats: bool):
    """(CE sum, top-1 hits, entropy sum) of one chunk of trained positions."""
    logits = output_logits(model, h).float()
    ce_sum = F.cross_entropy(logits, target, reduction="sum")
    if not with_stats:
        zero = ce_sum.detach() * 0
        return ce_sum, zero, zero
    with torch.no_grad():
        correct = (logits.detach().argmax(-1) == target).sum().to(ce_sum.dtype)
        entropy = entropy_from_logits(logits.detach()).sum()
    return ce_sum, correct, entropy


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
