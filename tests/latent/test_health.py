"""Latent-health statistics against plain loops, and the collapse rule."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mirage_trl.latent.health import (
    COLLAPSE_CROSS_COS,
    collapse_reason,
    cross_sample_cos,
    effective_rank,
    latent_health,
)


def _loop_cross(spans):
    vals = [
        F.cosine_similarity(spans[a, j], spans[b, j], dim=0)
        for j in range(spans.shape[1])
        for a in range(spans.shape[0])
        for b in range(spans.shape[0])
        if a != b
    ]
    return float(torch.stack(vals).mean())


def _loop_consecutive(spans):
    vals = [
        F.cosine_similarity(spans[s, j], spans[s, j + 1], dim=0)
        for s in range(spans.shape[0])
        for j in range(spans.shape[1] - 1)
    ]
    return float(torch.stack(vals).mean())


def _numpy_effective_rank(x):
    import numpy as np

    s = np.linalg.svd(x.double().numpy(), compute_uv=False)
    p = s / s.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def test_statistics_equal_plain_loops():
    torch.manual_seed(0)
    spans = torch.randn(5, 3, 16) + torch.randn(16)  # a shared component, as real latents have
    latents = spans.reshape(-1, 16)
    stats = latent_health(latents, 3, reference_norm=2.0)
    assert float(stats["cross_sample_cos"]) == pytest.approx(_loop_cross(spans), abs=1e-6)
    assert float(stats["consecutive_cos"]) == pytest.approx(_loop_consecutive(spans), abs=1e-6)
    assert float(stats["norm"]) == pytest.approx(float(latents.norm(dim=-1).mean()), rel=1e-6)
    assert float(stats["norm_ratio"]) == pytest.approx(float(latents.norm(dim=-1).mean()) / 2.0, rel=1e-6)
    assert float(stats["effective_rank"]) == pytest.approx(_numpy_effective_rank(latents), rel=1e-5)


def test_collapsed_latents_are_named_and_healthy_ones_are_not():
    torch.manual_seed(0)
    one = torch.randn(16)
    collapsed = one.repeat(8, 1) + 1e-3 * torch.randn(8, 16)
    stats = {k: float(v) for k, v in latent_health(collapsed, 2).items()}
    assert stats["cross_sample_cos"] > COLLAPSE_CROSS_COS
    assert effective_rank(one.repeat(8, 1)) == pytest.approx(1.0, abs=1e-4)
    assert "collapsed" in collapse_reason(stats)
    healthy = {k: float(v) for k, v in latent_health(torch.randn(8, 16), 2).items()}
    assert collapse_reason(healthy) is None


def test_too_few_spans_leave_out_what_cannot_be_measured():
    one_span = latent_health(torch.randn(4, 8), 4)
    assert "cross_sample_cos" not in one_span and "consecutive_cos" in one_span
    k1 = latent_health(torch.randn(3, 8), 1)
    assert "consecutive_cos" not in k1 and "cross_sample_cos" in k1
    cut = latent_health(torch.randn(5, 8), 2)  # a span cut by a length limit: no span statistics
    assert "cross_sample_cos" not in cut and "effective_rank" in cut
    assert latent_health(torch.zeros(0, 8), 2) == {}
    assert collapse_reason({"norm": 1.0}) is None


def test_cross_sample_cos_of_identical_spans_is_one():
    spans = torch.randn(1, 2, 8).repeat(4, 1, 1)
    assert float(cross_sample_cos(spans)) == pytest.approx(1.0, abs=1e-6)
