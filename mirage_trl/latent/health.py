"""Latent health: do the latents carry the input, or have they collapsed to one vector?

Latent reasoning can learn to ignore its latents: every span then holds nearly the same vectors,
whatever the image, and replacing them with zeros or noise costs nothing. These statistics make
that visible during training (logged under `latent/...` by the SFT and GRPO trainers) and at
evaluation (`mirage-trl eval` results and tables):

* ``cross_sample_cos``: mean cosine between the latents of *different* spans at the same position
  in the span (1.0: every input gets the same latent);
* ``consecutive_cos``: mean cosine between neighbouring latents within a span (1.0: the span
  repeats one vector);
* ``norm`` and, when a reference norm is known, ``norm_ratio`` = norm / stage-1 target norm (how
  far the fed-back scale is from what the model saw at the slots in stage 1);
* ``effective_rank``: exp of the entropy of the normalised singular values of the latents
  (Roy & Vetterli 2007): 1 for one direction, up to min(n, D).

`collapse_reason` applies the documented thresholds (docs/experiments.md, "Latent health").
All statistics of a batch are computed on the device without a host sync; callers sync once (the
trainers: one gather of every metric of a step). The trainers compute `effective_rank` on the steps
they log only (`with_rank`): its SVD is the one statistic that costs more than a few reductions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# A span position whose latents agree this closely across inputs carries (almost) nothing about them:
# random unit vectors in a 64-dim space have |cos| ~ 0.13, the collapsed runs we saw 0.99-1.0.
COLLAPSE_CROSS_COS = 0.95
# Fewer than this many effective directions over a batch of spans: one vector plus noise.
COLLAPSE_EFFECTIVE_RANK = 1.5
# What `latent_health` returns (logged as `latent/<name>` by every trainer).
HEALTH_KEYS = ("norm", "norm_ratio", "cross_sample_cos", "consecutive_cos", "effective_rank")


def _unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1, eps=1e-12)


def cross_sample_cos(spans: torch.Tensor) -> torch.Tensor:
    """Mean cosine over pairs of different spans at the same position; `spans` (S, k, D), S >= 2.

    sum_{a != b} <u_a, u_b> = |sum_a u_a|^2 - S per position, so no (S, S) matrix is built."""
    u = _unit(spans)
    s = u.shape[0]
    total = u.sum(dim=0).pow(2).sum(dim=-1)  # (k,)
    return ((total - s) / (s * (s - 1))).mean()


def consecutive_cos(spans: torch.Tensor) -> torch.Tensor:
    """Mean cosine between latent j and j+1 of each span; `spans` (S, k, D), k >= 2."""
    return (_unit(spans[:, 1:]) * _unit(spans[:, :-1])).sum(-1).mean()


def effective_rank(latents: torch.Tensor) -> torch.Tensor:
    """exp(entropy of the normalised singular values) of the (n, D) latents.

    Non-finite entries count as 0 here (the SVD would fail): such a step is stopped or skipped by the
    numerical guard anyway, and its other statistics are NaN."""
    s = torch.linalg.svdvals(torch.nan_to_num(latents.float(), nan=0.0, posinf=0.0, neginf=0.0))
    p = s / s.sum().clamp(min=1e-12)
    entropy = -(p * torch.log(p.clamp(min=1e-12))).sum()
    return entropy.exp()


def latent_health(
    latents: torch.Tensor,
    latent_size: int,
    reference_norm: float | torch.Tensor | None = None,
    with_rank: bool = True,
) -> dict[str, torch.Tensor]:
    """Health statistics (0-dim tensors) of (n, D) latents laid out as whole spans of `latent_size`.

    Statistics that need more than one span (or more than one latent per span) are left out when
    the batch has too few; `reference_norm` adds `norm_ratio`. `with_rank=False` leaves out
    `effective_rank`, the one statistic that needs a decomposition (an SVD of the batch's latents): the
    trainers measure it on their logging steps only."""
    latents = latents.detach()
    out: dict[str, torch.Tensor] = {}
    if latents.shape[0] == 0:
        return out
    norm = latents.float().norm(dim=-1).mean()
    out["norm"] = norm
    if reference_norm is not None:
        out["norm_ratio"] = norm / torch.as_tensor(reference_norm, dtype=norm.dtype, device=norm.device)
    k = latent_size
    if latents.shape[0] % k == 0:
        spans = latents.reshape(-1, k, latents.shape[-1])
        if spans.shape[0] >= 2:
            out["cross_sample_cos"] = cross_sample_cos(spans)
        if k >= 2:
            out["consecutive_cos"] = consecutive_cos(spans)
    if with_rank and latents.shape[0] >= 2:
        out["effective_rank"] = effective_rank(latents)
    return out


def collapse_reason(stats: dict[str, float]) -> str | None:
    """Why these (host) statistics look collapsed, or None. Needs cross_sample_cos (two spans or more)."""
    cross = stats.get("cross_sample_cos")
    if cross is None:
        return None
    if cross >= COLLAPSE_CROSS_COS:
        rank = stats.get("effective_rank")
        more = f", effective rank {rank:.2f}" if rank is not None else ""
        return (
            f"latents have collapsed: different inputs get nearly the same latents (cross-sample cosine "
            f"{cross:.3f} >= {COLLAPSE_CROSS_COS}{more}); they carry little about the image"
        )
    rank = stats.get("effective_rank")
    if rank is not None and rank < COLLAPSE_EFFECTIVE_RANK:
        return (
            f"latents have collapsed to one direction (effective rank {rank:.2f} < {COLLAPSE_EFFECTIVE_RANK})"
        )
    return None
