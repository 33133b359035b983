"""Stage-2 rounds: which tokens run together, and the attention of one packed round.

`plan_rounds` is pure index planning on CPU (built once per batch): every real token of a batch goes
to a round (round r holds each sample's r-th slot and its text up to the next slot, "aligned"; or
those rounds cut into smaller ones, "split", for per-round checkpointing), and each round is laid
out packed (sample after sample, no padding), with the index tensors that gather its queries and
keys per sample. `rounds_attention` is the attention implementation that uses them, switched on
only inside a round (`packed_round`); its mask is causal by rank, opens each image block both ways for
families whose images attend bidirectionally (Gemma 3, `round_mask`) and applies a sliding-window layer's
window. `latent.stage2` runs the rounds.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass

import torch

from ..errors import MirageError


@dataclass
class RoundLayout:
    """Index tensors of one round. Its tokens run packed in one row (sample after sample, no padding)
    through every linear layer; only attention sees them per sample, padded (`rounds_attention`)."""

    src: torch.Tensor  # (T_r,) flat index b * L + t of each packed token
    q_index: torch.Tensor  # (B * W_r,) packed index in the round of each padded query (0 for padding)
    q_rank: torch.Tensor  # (B, W_r) rank of each query among its sample's real tokens (0 for padding)
    out_index: torch.Tensor  # (T_r,) place of each packed token in the padded (B * W_r) layout
    k_index: torch.Tensor  # (B * K_r,) packed index in the cache of each padded key (0 for padding)
    slot_local: torch.Tensor  # (n_r,) packed index in the round of the round's slots, sample order
    # for each source round r' < r: (positions among the round's slots, packed index in round r')
    sources: list[tuple[int, torch.Tensor, torch.Tensor]]

    def to(self, device) -> RoundLayout:
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return RoundLayout(
            move(self.src),
            move(self.q_index),
            move(self.q_rank),
            move(self.out_index),
            move(self.k_index),
            move(self.slot_local),
            [(rp, move(w), move(c)) for rp, w, c in self.sources],
        )


@dataclass
class RoundPlan:
    """Where each real token of the batch goes in the rounds (built once per batch on CPU)."""

    lengths: list[int]  # W_r: the longest chunk of round r (attention pads each sample's chunk to it)
    tokens: list[int]  # T_r: real tokens of round r (what the linear layers compute)
    rounds: list[RoundLayout]
    back: torch.Tensor  # (B, L) packed index (all rounds concatenated) of each position (0 for padding)
    latent_order: torch.Tensor  # (n,) gather index: round-order latents -> row-major latents
    schedule: str
    batch_size: int

    @property
    def computed_tokens(self) -> int:
        """Token positions the linear layers run: the real tokens, whatever the schedule."""
        return sum(self.tokens)


def _aligned_schedule(n_real: list[int], slot_ranks: list[list[int]]) -> list[list[int]]:
    """Chunk r of every sample = its text from its (r-1)-th slot to its r-th slot (docs/method.md section 3)."""
    R = max(len(s) for s in slot_ranks) + 1
    out = [[0] * len(n_real) for _ in range(R)]
    for b, (n, sl) in enumerate(zip(n_real, slot_ranks)):
        cuts = [0, *sl, n]
        for r in range(len(cuts) - 1):
            out[r][b] = cuts[r + 1] - cuts[r]
    return out


def _split_schedule(
    table: list[list[int]], max_tokens: int, first_min: list[int] | None = None
) -> list[list[int]]:
    """The aligned rounds, each one over `max_tokens` real tokens cut into that many equal rounds.

    A chunk may end anywhere (the rounds are causal); every sample's chunk is cut into the same
    number of near-equal pieces, largest first, so a slot stays the first token of its first piece.
    `first_min[b]`: sample b's first piece of round 0 holds at least that many tokens (its image
    tokens, which must run in the round that gets the pixel values).
    """
    out = []
    for r, row in enumerate(table):
        parts = max(1, -(-sum(row) // max_tokens))
        pieces = [[c // parts + (1 if i < c % parts else 0) for i in range(parts)] for c in row]
        if r == 0 and first_min:
            for b, c in enumerate(row):
                head = min(c, max(first_min[b], pieces[b][0]))
                rest = c - head
                pieces[b] = [head] + [
                    rest // (parts - 1) + (1 if i < rest % (parts - 1) else 0) for i in range(parts - 1)
                ]
        out.extend([p[i] for p in pieces] for i in range(parts))
    return [row for row in out if any(row)]  # images held in the first piece can leave a piece empty


def plan_rounds(
    attention_mask: torch.Tensor,
    slot_mask: torch.Tensor,
    schedule: str = "auto",
    max_round_tokens: int | None = None,
    keep_together: torch.Tensor | None = None,
    min_rounds: int | None = None,
    tokens_per_layer: int | None = None,
) -> RoundPlan:
    """Assign every real token of the batch to a round, and lay each round out packed.

    "aligned": round r = each sample's r-th slot and its text up to the next slot (rounds = most slots
    + 1), the fewest dependent rounds. "split": the aligned rounds with any round of more than
    `max_round_tokens` real tokens cut into equal rounds (more rounds, a smaller largest round: what
    per-round checkpointing keeps in memory). "auto": "split" when `max_round_tokens` is given and
    some round exceeds it, else "aligned". Every round runs its real tokens packed in one row, so no
    schedule computes padding in the linear layers. `keep_together` (B, L) bool marks tokens (the
    image tokens) that must all run in the first round. `min_rounds`: at least this many rounds, the largest
    ones cut in two until there are (what lets every ZeRO-3 rank run as many rounds as the others: each round
    gathers every layer's weights, a collective all ranks must make equally often). `tokens_per_layer`: with no
    `max_round_tokens`, cap the rounds at the batch's real tokens / this many layers (the checkpointing default),
    counted here on the host copy of the masks.

    The masks reach the host in one copy (a GPU waits for its queue once per plan).
    """
    if attention_mask.shape != slot_mask.shape:
        raise MirageError(
            f"slot_mask {tuple(slot_mask.shape)} and attention_mask {tuple(attention_mask.shape)} differ in shape"
        )
    masks = [attention_mask, slot_mask] + ([keep_together] if keep_together is not None else [])
    host = torch.stack([m.detach().bool() for m in masks]).to("cpu")  # the one device-to-host copy
    attn, slots = host[0], host[1]
    keep_together = host[2] if keep_together is not None else None
    if max_round_tokens is None and tokens_per_layer is not None:
        max_round_tokens = max(1, -(-int(attn.sum()) // tokens_per_layer))
    if bool((slots & ~attn).any()):
        raise MirageError("slot_mask marks padding positions as latent slots")
    if schedule not in ("auto", "aligned", "split"):
        raise MirageError(f"unknown round schedule {schedule!r}; choose auto, aligned or split")
    if max_round_tokens is not None and max_round_tokens < 1:
        raise MirageError(f"max_round_tokens must be at least 1, got {max_round_tokens}")
    B, L = attn.shape
    rank = attn.long().cumsum(1) - 1  # rank of each real token among its sample's real tokens
    n_real = attn.sum(1).tolist()
    slot_ranks = [rank[b][slots[b]].tolist() for b in range(B)]
    if any(sl and sl[0] == 0 for sl in slot_ranks):
        raise MirageError("a latent slot is the first token of its sequence: it has no previous hidden state")
    first_min = _image_prefix(keep_together, attn, rank, slot_ranks)
    chosen = "aligned"
    table = _aligned_schedule(n_real, slot_ranks)
    if schedule == "split" and max_round_tokens is None:
        raise MirageError('schedule "split" needs max_round_tokens')
    if schedule != "aligned" and max_round_tokens is not None:
        if schedule == "split" or max(sum(row) for row in table) > max_round_tokens:
            table, chosen = _split_schedule(table, max_round_tokens, first_min), "split"
    if min_rounds is not None and len(table) < min_rounds:
        table = _at_least(table, min_rounds, first_min)
        chosen = "split"
    chunk = torch.tensor(table, dtype=torch.long).T  # (B, R) chunk lengths
    rounds, back, latent_order = _lay_out(chunk, attn, slots, n_real)
    return RoundPlan(
        chunk.max(0).values.tolist(), chunk.sum(0).tolist(), rounds, back, latent_order, chosen, B
    )


def _image_prefix(keep_together, attn, rank, slot_ranks) -> list[int] | None:
    """Per sample, how many leading tokens must run in the first round (through its last image token)."""
    if keep_together is None:
        return None
    kt = keep_together & attn  # both host tensors (plan_rounds copied them)
    first_min = torch.where(kt, rank + 1, 0).max(1).values.tolist()  # rank of the last one + 1
    for b, (m, sl) in enumerate(zip(first_min, slot_ranks)):
        if sl and m > sl[0]:
            raise MirageError(
                f"sample {b}: an image comes after its first latent slot (token {sl[0]}); "
                "images must come before the first <|latent_start|> span"
            )
    return first_min


def _at_least(table: list[list[int]], rounds: int, first_min: list[int] | None) -> list[list[int]]:
    """`table` with its largest splittable round cut in two (each sample's chunk halved, the first half
    keeping the slot and, in round 0, the image tokens) until it has `rounds` rounds."""
    table = [list(row) for row in table]
    while len(table) < rounds:
        best = None
        for r, row in enumerate(table):
            heads = [
                max(-(-c // 2), first_min[b] if (r == 0 and first_min) else 0) for b, c in enumerate(row)
            ]
            heads = [min(h, c) for h, c in zip(heads, row)]
            tails = [c - h for h, c in zip(heads, row)]
            if any(tails) and (best is None or sum(row) > best[0]):
                best = (sum(row), r, heads, tails)
        if best is None:
            raise MirageError(
                f"this batch has {sum(map(sum, table))} real tokens, too few for the {rounds} rounds another rank "
                "runs (ZeRO-3 needs every rank to run as many rounds); use a larger per-device batch"
            )
        _, r, heads, tails = best
        table[r : r + 1] = [heads, tails]
    return table


def _lay_out(chunk: torch.Tensor, attn: torch.Tensor, slots: torch.Tensor, n_real: list[int]):
    """(round layouts, back, latent_order) of a (B, R) table of chunk lengths: the packed index tensors."""
    B, L = attn.shape
    R = chunk.shape[1]
    tokens = chunk.sum(0)  # T_r
    g_off = tokens.cumsum(0) - tokens  # packed offset of each round
    in_round = chunk.cumsum(0) - chunk  # (B, R) offset of sample b's chunk inside round r
    chunk_start = chunk.cumsum(1) - chunk  # (B, R) rank of each chunk's first token
    back = torch.zeros(B, L, dtype=torch.long)
    n_max = max(n_real) if B else 0
    rank_to_packed = torch.zeros(B, max(n_max, 1), dtype=torch.long)
    src = torch.zeros(int(tokens.sum()), dtype=torch.long)
    for b in range(B):  # vector ops per sample, no loop over tokens
        n = n_real[b]
        r_of = torch.repeat_interleave(torch.arange(R), chunk[b])  # round of each real token, by rank
        packed = g_off[r_of] + in_round[b][r_of] + torch.arange(n) - chunk_start[b][r_of]
        pos = attn[b].nonzero().flatten()
        back[b, pos] = packed
        rank_to_packed[b, :n] = packed
        src[packed] = b * L + pos
    # Slots: round, packed index in the round, and predecessor (round, packed index), row-major order.
    sb, st = slots.nonzero(as_tuple=True)
    g = back[sb, st]
    round_of_slot = torch.searchsorted(g_off, g, right=True) - 1
    pred = back[sb, st - 1]
    pred_round = torch.searchsorted(g_off, pred, right=True) - 1
    pred_local = pred - g_off[pred_round]
    seen = chunk.cumsum(1)  # (B, R) tokens of each sample through round r (its keys)
    ranks_k = torch.arange(max(n_max, 1))
    rounds, order = [], []
    for r in range(R):
        T, W, K = int(tokens[r]), int(chunk[:, r].max()), int(seen[:, r].max())
        b_of = torch.repeat_interleave(torch.arange(B), chunk[:, r])
        j = torch.arange(T) - in_round[b_of, r]
        out_index = b_of * W + j
        q_index = torch.zeros(B * W, dtype=torch.long)
        q_index[out_index] = torch.arange(T)
        q_rank = torch.zeros(B * W, dtype=torch.long)
        q_rank[out_index] = chunk_start[b_of, r] + j
        sel = (round_of_slot == r).nonzero().flatten()  # sample order = packed order (one slot a sample)
        sources = []
        for rp in pred_round[sel].unique().tolist():
            where_ = (pred_round[sel] == rp).nonzero().flatten()
            sources.append((rp, where_, pred_local[sel][where_]))
        rounds.append(
            RoundLayout(
                src=src[int(g_off[r]) : int(g_off[r]) + T],
                q_index=q_index,
                q_rank=q_rank.view(B, W),
                out_index=out_index,
                k_index=torch.where(ranks_k[:K] < seen[:, r : r + 1], rank_to_packed[:, :K], 0).reshape(-1),
                slot_local=g[sel] - g_off[r],
                sources=sources,
            )
        )
        order.append(sel)
    round_major = torch.cat(order) if order else torch.zeros(0, dtype=torch.long)
    return rounds, back, torch.argsort(round_major)


# --------------------------------------------------------------------------- packed-round attention

ROUNDS_ATTENTION = "mirage_rounds"
_ACTIVE_ROUND: contextvars.ContextVar = contextvars.ContextVar("mirage_active_round")


def rounds_attention(module, query, key, value, attention_mask, **kwargs):
    """Attention of one packed round: each sample's queries against its own keys only.

    query (1, H, T_r, d) holds the round's tokens sample after sample; key/value (1, H_kv, P, d) the
    whole cache (every round so far, packed the same way). They are gathered into a padded
    (B, H, W_r, d) / (B, H_kv, K_r, d) layout, run through SDPA with a causal-by-rank mask, and
    scattered back, so the linear layers never compute padding. Registered as an attention
    implementation and switched on only inside the rounds; it runs SDPA whatever the model's own
    implementation (eager, sdpa or flash-attention compute the same attention).
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    layout, mask = _ACTIVE_ROUND.get()
    B, W = layout.q_rank.shape
    window = kwargs.get("sliding_window")
    if window is not None:  # a sliding-window layer: keys more than `window - 1` ranks back are out of reach
        ranks = torch.arange(mask.shape[-1], device=mask.device)
        mask = mask & (ranks[None, None, None, :] > layout.q_rank[:, None, :, None] - window)
    H, d = query.shape[1], query.shape[3]
    Hk, K = key.shape[1], layout.k_index.numel() // B
    q = query[0].index_select(1, layout.q_index).view(H, B, W, d).transpose(0, 1)
    k = key[0].index_select(1, layout.k_index).view(Hk, B, K, d).transpose(0, 1)
    v = value[0].index_select(1, layout.k_index).view(Hk, B, K, value.shape[3]).transpose(0, 1)
    out, _ = sdpa_attention_forward(module, q, k, v, mask, **kwargs)  # (B, W, H, d)
    return out.reshape(B * W, *out.shape[2:]).index_select(0, layout.out_index)[None], None


def _register_rounds_attention():
    from transformers import AttentionInterface

    AttentionInterface.register(ROUNDS_ATTENTION, rounds_attention)


def round_mask(layout: RoundLayout, rank_blocks: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 1, W_r, K_r) bool: a query sees its sample's keys of rank <= its own (padding sees key 0) and,
    with `rank_blocks` ((B, n) block id of each sample's token by rank, -1 outside blocks: see
    `ModelFamily.attention_blocks`), every key of its own block (an image's tokens see each other)."""
    B = layout.q_rank.shape[0]
    K = layout.k_index.numel() // B
    ranks = torch.arange(K, device=layout.q_rank.device)
    mask = ranks[None, None, :] <= layout.q_rank[:, :, None]
    if rank_blocks is not None:
        n = rank_blocks.shape[1]
        q_block = rank_blocks.gather(1, layout.q_rank.clamp(max=n - 1))
        # Blocks are images, which all run in round 0 (`plan_rounds(keep_together=...)`): a key slot past a
        # sample's cached tokens is text or padding there, so its block is -1 and opens nothing.
        k_block = torch.full((B, K), -1, dtype=rank_blocks.dtype, device=rank_blocks.device)
        k_block[:, : min(K, n)] = rank_blocks[:, :K]
        mask = mask | ((q_block[:, :, None] == k_block[:, None, :]) & (q_block[:, :, None] >= 0))
    return mask[:, None]


def by_rank(values: torch.Tensor, attention_mask: torch.Tensor, fill) -> torch.Tensor:
    """(B, n): `values` (B, L) of each sample's real tokens by rank (padding dropped), `fill` past its end."""
    real = attention_mask.bool()
    rank = real.long().cumsum(1) - 1
    shape = (attention_mask.shape[0], max(int(real.sum(1).max()), 1))
    out = torch.full(shape, fill, dtype=values.dtype, device=values.device)
    out[real.nonzero(as_tuple=True)[0], rank[real]] = values[real]
    return out


def without_blind_pairs(
    mask: torch.Tensor, layout: RoundLayout, rank_blind: torch.Tensor, rank_images: torch.Tensor
) -> torch.Tensor:
    """A round's mask (B, 1, W_r, K_r) under the visual bottleneck (`latent.bottleneck`): a blind query
    (`rank_blind`, (B, n) by rank) sees no image key (`rank_images`, (B, n) by rank)."""
    B, K = mask.shape[0], mask.shape[-1]
    n = rank_blind.shape[1]
    q_blind = rank_blind.gather(1, layout.q_rank.clamp(max=n - 1))
    k_image = torch.zeros(B, K, dtype=torch.bool, device=mask.device)
    k_image[:, : min(K, n)] = rank_images[:, :K]
    return mask & ~(q_blind[:, None, :, None] & k_image[:, None, None, :])


@contextlib.contextmanager
def packed_round(language_model, layout: RoundLayout, mask: torch.Tensor):
    """Run the language model with `rounds_attention` for one round, then restore its implementation."""
    _register_rounds_attention()
    config = language_model.config
    before = config._attn_implementation_internal
    config._attn_implementation_internal = ROUNDS_ATTENTION
    token = _ACTIVE_ROUND.set((layout, mask))
    try:
        yield
    finally:
        _ACTIVE_ROUND.reset(token)
        config._attn_implementation_internal = before
