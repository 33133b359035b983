"""`latent.rounds.plan_rounds` (tensor operations over the whole batch) against a plan written token by token.

The reference walks every sample and every round in plain Python: it cuts each sample's real tokens at its slots
(aligned), cuts the rounds over the cap into near-equal pieces (split), halves the largest rounds up to a minimum
count, then gives every token of every round its packed index, padded query place and keys. Random batches of both
paddings, with and without image prefixes, caps and minimum round counts, must give identical plans.
"""

from __future__ import annotations

import random

import pytest
import torch

from mirage_trl.errors import MirageError
from mirage_trl.latent.rounds import plan_rounds


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _near_equal(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def reference_table(ranks_of_slots, n_real, cap=None, first_min=None, min_rounds=None):
    """Rounds x samples chunk lengths, by the definitions (docs/method.md section 3)."""
    B = len(n_real)
    R = max(len(s) for s in ranks_of_slots) + 1
    table = [[0] * B for _ in range(R)]
    for b in range(B):
        cuts = [0, *ranks_of_slots[b], n_real[b]]
        for r in range(len(cuts) - 1):
            table[r][b] = cuts[r + 1] - cuts[r]
    split = False
    if cap is not None and max(sum(row) for row in table) > cap:
        split = True
        out = []
        for r, row in enumerate(table):
            parts = max(1, _ceil(sum(row), cap))
            pieces = [_near_equal(c, parts) for c in row]
            if r == 0 and first_min is not None and parts > 1:
                for b, c in enumerate(row):
                    head = min(c, max(first_min[b], pieces[b][0]))
                    pieces[b] = [head, *_near_equal(c - head, parts - 1)]
            out.extend([p[i] for p in pieces] for i in range(parts))
        table = [row for row in out if any(row)]
    while min_rounds is not None and len(table) < min_rounds:
        split = True
        best = None
        for r, row in enumerate(table):
            heads = [
                min(c, max(_ceil(c, 2), first_min[b] if (r == 0 and first_min is not None) else 0))
                for b, c in enumerate(row)
            ]
            tails = [c - h for h, c in zip(heads, row)]
            if any(tails) and (best is None or sum(row) > best[0]):
                best = (sum(row), r, heads, tails)
        if best is None:
            return None, True  # too few tokens to cut
        _, r, heads, tails = best
        table[r : r + 1] = [heads, tails]
    return table, split


def reference_layout(attn, slots, table):
    """Every token's packed index, query place and keys, one token at a time."""
    B, L = attn.shape
    positions = [[t for t in range(L) if attn[b, t]] for b in range(B)]
    R = len(table)
    start = [[sum(table[q][b] for q in range(r)) for r in range(R)] for b in range(B)]
    packed_of, round_of = {}, {}
    offset = 0
    rounds = []
    round_major = []
    for r in range(R):
        W = max(table[r])
        K = max(start[b][r] + table[r][b] for b in range(B))
        src, out_index, slot_local, feeds = [], [], [], []
        q_index, q_rank = [0] * (B * W), [0] * (B * W)
        local = 0
        for b in range(B):
            for j in range(table[r][b]):
                rank = start[b][r] + j
                packed_of[(b, rank)] = offset + local
                round_of[(b, rank)] = r
                src.append(b * L + positions[b][rank])
                out_index.append(b * W + j)
                q_index[b * W + j] = local
                q_rank[b * W + j] = rank
                if slots[b, positions[b][rank]]:
                    slot_local.append(local)
                    pred_round = round_of[(b, rank - 1)]
                    pred_offset = sum(sum(table[q]) for q in range(pred_round))
                    feeds.append((pred_round, len(slot_local) - 1, packed_of[(b, rank - 1)] - pred_offset))
                    round_major.append((b, positions[b][rank]))
                local += 1
        k_index = [
            packed_of[(b, k)] if k < start[b][r] + table[r][b] else 0 for b in range(B) for k in range(K)
        ]
        sources = [
            (rp, [w for p, w, _ in feeds if p == rp], [c for p, _, c in feeds if p == rp])
            for rp in sorted({p for p, _, _ in feeds})
        ]
        rounds.append(dict(src=src, q_index=q_index, q_rank=q_rank, out_index=out_index, k_index=k_index,
                           slot_local=slot_local, sources=sources, W=W))  # fmt: skip
        offset += local
    back = [
        [packed_of.get((b, positions[b].index(t)), 0) if attn[b, t] else 0 for t in range(L)]
        for b in range(B)
    ]
    row_major = sorted(round_major)
    latent_order = [round_major.index(s) for s in row_major]
    return rounds, back, latent_order


def random_batch(rng: random.Random, padding: str):
    B = rng.randint(1, 5)
    L = rng.randint(6, 40)
    attn = torch.zeros(B, L, dtype=torch.bool)
    slots = torch.zeros(B, L, dtype=torch.bool)
    images = torch.zeros(B, L, dtype=torch.bool)
    for b in range(B):
        n = rng.randint(2, L)
        where = range(L - n, L) if padding == "left" else range(n)
        attn[b, list(where)] = True
        ranks = sorted(rng.sample(range(1, n), rng.randint(0, min(4, n - 1))))
        first = ranks[0] if ranks else n
        image_end = rng.randint(0, min(first, 5))
        for rank in ranks:
            slots[b, where[rank]] = True
        images[b, [where[i] for i in range(image_end)]] = True
    return attn, slots, images


def _compare(attn, slots, images, cap, min_rounds):
    B = attn.shape[0]
    rank = attn.long().cumsum(1) - 1
    ranks_of_slots = [rank[b][slots[b]].tolist() for b in range(B)]
    n_real = attn.sum(1).tolist()
    first_min = None
    if images is not None:
        first_min = torch.where(images & attn, rank + 1, 0).max(1).values.tolist()
    table, split = reference_table(ranks_of_slots, n_real, cap, first_min, min_rounds)
    if table is None:
        with pytest.raises(MirageError, match="too few"):
            plan_rounds(attn, slots, max_round_tokens=cap, keep_together=images, min_rounds=min_rounds)
        return
    plan = plan_rounds(attn, slots, max_round_tokens=cap, keep_together=images, min_rounds=min_rounds)
    assert plan.schedule == ("split" if split else "aligned")
    assert plan.tokens == [sum(row) for row in table]
    assert plan.lengths == [max(row) for row in table]
    rounds, back, latent_order = reference_layout(attn, slots, table)
    assert len(plan.rounds) == len(rounds)
    for got, want in zip(plan.rounds, rounds):
        for name in ("src", "q_index", "out_index", "k_index", "slot_local"):
            assert getattr(got, name).tolist() == want[name], name
        assert got.q_rank.tolist() == [want["q_rank"][b * want["W"] : (b + 1) * want["W"]] for b in range(B)]
        assert [(rp, w.tolist(), c.tolist()) for rp, w, c in got.sources] == want["sources"]
    assert plan.back.tolist() == back
    assert plan.latent_order.tolist() == latent_order


@pytest.mark.parametrize("padding", ["right", "left"])
def test_plans_equal_a_token_by_token_plan(padding):
    rng = random.Random(0 if padding == "right" else 1)
    for _ in range(60):
        attn, slots, images = random_batch(rng, padding)
        real = int(attn.sum())
        cap = rng.choice([None, None, max(1, real // 4), max(1, real // 2), 3])
        min_rounds = rng.choice([None, None, int(slots.sum(1).max()) + 3])
        _compare(attn, slots, rng.choice([None, images]), cap, min_rounds)


def test_plan_errors_name_the_sample_and_the_token():
    attn = torch.ones(2, 8, dtype=torch.bool)
    slots = torch.zeros(2, 8, dtype=torch.bool)
    slots[1, 3] = True
    late = torch.zeros(2, 8, dtype=torch.bool)
    late[1, :5] = True
    with pytest.raises(
        MirageError, match=r"sample 1: an image comes after its first latent slot \(token 3\)"
    ):
        plan_rounds(attn, slots, keep_together=late)
    first = torch.zeros(2, 8, dtype=torch.bool)
    first[0, 0] = True
    with pytest.raises(MirageError, match="first token of its sequence"):
        plan_rounds(attn, first)
    with pytest.raises(MirageError, match="too few for the 100 rounds"):
        plan_rounds(attn, slots, min_rounds=100)
