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


def _aligned_schedule(attn: torch.Tensor, slots: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
    """(B, R) chunk lengths: chunk r of every sample = its text from its (r-1)-th slot to its r-th slot
    (docs/method.md section 3), R = most slots + 1; a sample with fewer slots gets empty chunks at the end."""
    B = attn.shape[0]
    counts = slots.sum(1)
    R = int(counts.max()) + 1 if B else 1
    cuts = attn.sum(1)[:, None].repeat(1, R + 1)  # [0, slot ranks..., n, n, ...] per sample
    cuts[:, 0] = 0
    sb, st = slots.nonzero(as_tuple=True)
    cuts[sb, (slots.long().cumsum(1) - 1)[sb, st] + 1] = rank[sb, st]
    return cuts.diff(dim=1)


def _pieces(total: torch.Tensor, parts, index: torch.Tensor) -> torch.Tensor:
    """Piece `index` of `total` cut into `parts` near-equal pieces, largest first."""
    return total // parts + (index < total % parts).long()


def _split_schedule(
    table: torch.Tensor, max_tokens: int, first_min: torch.Tensor | None = None
) -> torch.Tensor:
    """The aligned rounds (`table`, (B, R) chunk lengths), each one over `max_tokens` real tokens cut into that many
    equal rounds.

    A chunk may end anywhere (the rounds are causal); every sample's chunk is cut into the same
    number of near-equal pieces, largest first, so a slot stays the first token of its first piece.
    `first_min[b]`: sample b's first piece of round 0 holds at least that many tokens (its image
    tokens, which must run in the round that gets the pixel values).
    """
    R = table.shape[1]
    parts = ((table.sum(0) + max_tokens - 1) // max_tokens).clamp(min=1)  # (R,) pieces of each round
    round_of = torch.repeat_interleave(torch.arange(R), parts)  # (R',) the round each piece comes from
    index = (
        torch.arange(round_of.numel()) - (parts.cumsum(0) - parts)[round_of]
    )  # the piece's place in its round
    out = _pieces(table[:, round_of], parts[round_of], index)
    p0 = int(parts[0])
    if (
        first_min is not None and p0 > 1
    ):  # round 0: the first piece keeps the images, the rest shares what is left
        c = table[:, 0]
        head = torch.minimum(c, torch.maximum(first_min, out[:, 0]))
        out[:, 0] = head
        out[:, 1:p0] = _pieces((c - head)[:, None], p0 - 1, torch.arange(p0 - 1))
    return out[:, out.any(0)]  # images held in the first piece can leave a piece empty


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

    The masks reach the host in one copy (a GPU waits for its queue once per plan); the plan is then tensor
    operations over the whole batch on the host, with no Python loop over samples or rounds (`_lay_out`).
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
    rank = attn.long().cumsum(1) - 1  # rank of each real token among its sample's real tokens
    if bool((slots & (rank == 0)).any()):
        raise MirageError("a latent slot is the first token of its sequence: it has no previous hidden state")
    first_min = _image_prefix(keep_together, attn, slots, rank)
    chosen = "aligned"
    table = _aligned_schedule(attn, slots, rank)
    if schedule == "split" and max_round_tokens is None:
        raise MirageError('schedule "split" needs max_round_tokens')
    if schedule != "aligned" and max_round_tokens is not None:
        if schedule == "split" or int(table.sum(0).max()) > max_round_tokens:
            table, chosen = _split_schedule(table, max_round_tokens, first_min), "split"
    if min_rounds is not None and table.shape[1] < min_rounds:
        table = _at_least(table, min_rounds, first_min)
        chosen = "split"
    rounds, back, latent_order = _lay_out(table, attn, slots, rank)
    return RoundPlan(
        table.max(0).values.tolist(), table.sum(0).tolist(), rounds, back, latent_order, chosen, attn.shape[0]
    )


def _image_prefix(keep_together, attn, slots, rank) -> torch.Tensor | None:
    """(B,) per sample, how many leading tokens must run in the first round (through its last image token)."""
    if keep_together is None:
        return None
    first_min = torch.where(keep_together & attn, rank + 1, 0).max(1).values  # rank of the last one + 1
    first_slot = torch.where(slots, rank, attn.shape[1]).min(1).values
    late = (first_min > first_slot).nonzero().flatten()
    if late.numel():
        b = int(late[0])
        raise MirageError(
            f"sample {b}: an image comes after its first latent slot (token {int(first_slot[b])}); "
            "images must come before the first <|latent_start|> span"
        )
    return first_min


def _at_least(table: torch.Tensor, rounds: int, first_min: torch.Tensor | None) -> torch.Tensor:
    """`table` with its largest splittable round cut in two (each sample's chunk halved, the first half
    keeping the slot and, in round 0, the image tokens) until it has `rounds` rounds."""
    while table.shape[1] < rounds:
        heads = (table + 1) // 2
        if first_min is not None:
            heads[:, 0] = torch.maximum(heads[:, 0], first_min)
        heads = torch.minimum(heads, table)
        tails = table - heads
        splittable = tails.any(0)
        if not bool(splittable.any()):
            raise MirageError(
                f"this batch has {int(table.sum())} real tokens, too few for the {rounds} rounds another rank "
                "runs (ZeRO-3 needs every rank to run as many rounds); use a larger per-device batch"
            )
        r = int(table.sum(0).masked_fill(~splittable, -1).argmax())  # the first of the largest
        table = torch.cat([table[:, :r], heads[:, r : r + 1], tails[:, r : r + 1], table[:, r + 1 :]], dim=1)
    return table


def _lay_out(chunk: torch.Tensor, attn: torch.Tensor, slots: torch.Tensor, rank: torch.Tensor):
    """(round layouts, back, latent_order) of a (B, R) table of chunk lengths: the packed index tensors.

    Every index is computed once for the whole batch (all rounds concatenated); each round's layout holds slices
    of those tensors."""
    B, L = attn.shape
    R = chunk.shape[1]
    tokens = chunk.sum(0)  # T_r
    widths = chunk.max(0).values  # W_r: each sample's chunk padded to the longest (attention only)
    seen = chunk.cumsum(1)  # (B, R) tokens of each sample through round r (its keys)
    keys = seen.max(0).values  # K_r
    g_off = tokens.cumsum(0) - tokens  # packed offset of each round
    in_round = chunk.cumsum(0) - chunk  # (B, R) offset of sample b's chunk inside round r
    chunk_start = seen - chunk  # (B, R) rank of each chunk's first token

    # Every real token: its round, its place in the round's chunk, its packed index (all rounds concatenated).
    sb, st = attn.nonzero(as_tuple=True)
    rk = rank[sb, st]
    r_of = torch.searchsorted(seen[sb], rk[:, None], right=True).squeeze(1)
    j = rk - chunk_start[sb, r_of]
    packed = g_off[r_of] + in_round[sb, r_of] + j
    total = int(tokens.sum())
    back = torch.zeros(B, L, dtype=torch.long)
    back[sb, st] = packed
    rank_to_packed = torch.zeros(B, max(int(attn.sum(1).max()) if B else 0, 1), dtype=torch.long)
    rank_to_packed[sb, rk] = packed
    src = torch.zeros(total, dtype=torch.long)
    src[packed] = sb * L + st

    # Queries: each round's padded (B, W_r) layout, all rounds concatenated.
    q_off = (B * widths).cumsum(0) - B * widths
    place = sb * widths[r_of] + j  # each token's place in its round's padded layout
    out_index = torch.zeros(total, dtype=torch.long)
    out_index[packed] = place
    q_index = torch.zeros(int((B * widths).sum()), dtype=torch.long)
    q_index[q_off[r_of] + place] = packed - g_off[r_of]
    q_rank = torch.zeros_like(q_index)
    q_rank[q_off[r_of] + place] = rk

    # Keys: round r's padded (B, K_r) cache layout holds each sample's first K_r ranks, those it has run through
    # round r (padding: key 0); all rounds at once, each round's layout a slice of it.
    by_rank = torch.arange(rank_to_packed.shape[1])
    keys_by_round = torch.where(by_rank < seen.T[:, :, None], rank_to_packed[None], 0)  # (R, B, n_max)

    # Slots: round, packed index in the round, and predecessor (round, packed index), row-major order.
    ssb, sst = slots.nonzero(as_tuple=True)
    g = back[ssb, sst]
    round_of_slot = torch.searchsorted(g_off, g, right=True) - 1
    pred = back[ssb, sst - 1]
    pred_round = torch.searchsorted(g_off, pred, right=True) - 1
    pred_local = pred - g_off[pred_round]
    round_major = torch.sort(
        round_of_slot, stable=True
    ).indices  # by round, sample order within (one slot each)
    per_round = torch.bincount(round_of_slot, minlength=R)
    among = torch.empty_like(round_major)  # each slot's place among its round's slots
    among[round_major] = (
        torch.arange(round_major.numel()) - (per_round.cumsum(0) - per_round)[round_of_slot[round_major]]
    )
    # the slots of round r fed from round r', grouped by (r, r') in that order
    pair = round_of_slot * R + pred_round
    by_pair = torch.sort(pair, stable=True).indices
    pairs, pair_sizes = torch.unique_consecutive(pair[by_pair], return_counts=True)
    sources: list[list] = [[] for _ in range(R)]
    for key, group in zip(pairs.tolist(), torch.split(by_pair, pair_sizes.tolist())):
        sources[key // R].append((key % R, among[group], pred_local[group]))

    def cut(t, sizes):
        return torch.split(t, sizes.tolist())

    rounds = [
        RoundLayout(
            src=s,
            q_index=qi,
            q_rank=qr.view(B, -1),
            out_index=oi,
            k_index=keys_by_round[r, :, :K].reshape(-1),
            slot_local=sl,
            sources=sources[r],
        )
        for r, (s, qi, qr, oi, K, sl) in enumerate(
            zip(
                cut(src, tokens),
                cut(q_index, B * widths),
                cut(q_rank, B * widths),
                cut(out_index, tokens),
                keys.tolist(),
                cut((g - g_off[round_of_slot])[round_major], per_round),
            )
        )
    ]
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
