"""The losses of Mirage training, one function each, found by name like the poolings of `latent.targets`:

* `text_cross_entropy`: next-token cross-entropy over the trained positions (stages 1 and 2), with the sums
  TRL's SFT trainer logs from the same logits;
* the latent losses (`LATENT_LOSSES`), how stage 1 supervises the hidden state h[t-1] before each latent slot
  t against the slot's target e[t]: `cosine`, the paper's mean of 1 - cos(h[t-1], e[t]).

A latent loss takes (predicted, targets), both (slots, D), and returns (loss, per-slot cosine): the cosine is
what the trainers log as `latent_cos` whatever the loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from trl.trainer.utils import entropy_from_logits  # TRL's own, chunked: no second vocab-size copy

from ..errors import MirageError
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


def cosine_loss(predicted: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's latent loss: mean over slots of 1 - cos(h[t-1], e[t])."""
    cos = cosine(predicted, targets)
    return (1.0 - cos).mean(), cos


LATENT_LOSSES = {"cosine": cosine_loss}


def latent_loss_fn(name: str):
    """The latent loss called `name`; an unknown name is one line listing the known ones."""
    if name not in LATENT_LOSSES:
        raise MirageError(f"unknown latent loss {name!r}; choose one of {', '.join(LATENT_LOSSES)}")
    return LATENT_LOSSES[name]
