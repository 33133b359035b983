"""Stage 2: one forward in which every latent slot is fed the model's own previous hidden state.

`self_latent_forward` returns the final-norm hidden states of a batch in which the input
embedding at each latent slot t is the final-norm hidden state at position t-1 of the same
sample, computed in the same pass, with gradients through every latent. A sample with m slots
needs m+1 dependent steps; every sample has its own slots (positions and count).

Methods (all exact; they differ in cost and in how they live with gradient checkpointing):

- ``"rounds"``: the batch runs in R = (most slots in a sample) + 1 rounds over one grad-carrying
  `DynamicCache`. Round 0 holds each sample's tokens before its first slot; round r holds its
  r-th slot (fed with its own last hidden state of round r-1) and the text up to its next slot.
  Segments of one round are right-padded to the round's longest; the padded keys are masked
  for ever after by a key-validity mask that grows with the cache. Each round gets an explicit
  additive 4-D mask (causal inside the round, full over valid past keys) and explicit 3-D rope
  positions gathered from the full-sequence positions. About one forward of compute.
  That "aligned" schedule pads each round to the longest segment, which costs 1.3x or more
  when spans sit at ragged positions; the "packed" schedule (`plan_rounds`) lets a text chunk
  end anywhere (rounds are causal, only a slot must open its chunk) and picks round lengths
  that cut the padded work, at the price of more rounds. `schedule="auto"` (default) takes the
  cheaper by an estimate B x sum(round lengths) + `round_overhead` x rounds.
- ``"rounds_checkpointed"``: the same rounds, each wrapped in
  ``torch.utils.checkpoint.checkpoint(use_reentrant=False)`` as a pure function of
  (round inputs, past key/value chunks) -> (hidden states, the round's new keys/values); the
  cache object is built fresh inside, and the model's own gradient checkpointing is switched off
  inside the function (also during the backward replay) because HF checkpointing drops the
  cache. Memory: per round only its inputs and keys/values are kept.
- ``"recompute"``: m+1 full-sequence passes; pass i fills every slot from pass i-1's hidden
  states (pass 0 with zeros). After pass i the first i slots carry their exact values, so the
  last pass is exact as a function of the weights and so are its gradients. Works with the
  model's own gradient checkpointing; costs m+1 forwards.
- ``"auto"``: ``"rounds_checkpointed"`` when the model has gradient checkpointing on, else
  ``"rounds"``.

Forcing ``"rounds"`` while the model has gradient checkpointing on is allowed: the model's
checkpointing is switched off for that call (a warning is logged once) so the cache path stays
exact; it is never run with checkpointing on (that is how the reference gives wrong gradients).

Latents always enter through `slots.latent_inputs` (the one slot-filling mechanism).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch
import torch.utils.checkpoint

from ..errors import MirageError
from .model_utils import multimodal_model, rope_positions, unwrap
from .slots import latent_inputs

logger = logging.getLogger(__name__)

METHODS = ("auto", "rounds", "rounds_checkpointed", "recompute")


@dataclass
class SelfLatentOutput:
    """Result of `self_latent_forward`.

    hidden_states: (B, L, D) final-norm hidden states; zeros at padding positions.
    latents: (n_slots, D) the vectors fed at the slots, row-major (sample by sample, in order).
    method: the method that ran (``"auto"`` resolved).
    steps: rounds (round methods) or full passes (recompute).
    computed_tokens: B x (sum of round lengths) for the round methods, B x L x passes for
        recompute: the token positions the model actually ran (padding included).
    """

    hidden_states: torch.Tensor
    latents: torch.Tensor
    method: str
    steps: int
    computed_tokens: int
    schedule: str = ""


# --------------------------------------------------------------------------- checkpointing flags


def is_checkpointing(model) -> bool:
    """Whether the (unwrapped) model has its own gradient checkpointing on."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in unwrap(model).modules())


@contextlib.contextmanager
def model_checkpointing_off(model):
    """Switch the model's own gradient checkpointing off (per module) and restore it exactly after."""
    switched = [m for m in unwrap(model).modules() if getattr(m, "gradient_checkpointing", False) is True]
    for m in switched:
        m.gradient_checkpointing = False
    try:
        yield
    finally:
        for m in switched:
            m.gradient_checkpointing = True


_warned_forced_rounds = False


def resolve_method(model, method: str) -> str:
    if method not in METHODS:
        raise MirageError(f"unknown stage-2 method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "auto":
        return "rounds_checkpointed" if is_checkpointing(model) else "rounds"
    return method


# --------------------------------------------------------------------------- the round plan


@dataclass
class RoundPlan:
    """Where each real token of the batch goes in the rounds (built once per batch on CPU)."""

    lengths: list[int]  # round lengths L_r (padded to the round's longest chunk)
    src: torch.Tensor  # (B, sum L_r) position in the padded sequence of each round column (0 for padding)
    valid: torch.Tensor  # (B, sum L_r) bool, real token
    back: torch.Tensor  # (B, L) column (in the concatenated rounds) of each sequence position (0 for padding)
    # per round: the samples with a slot at column 0 (sorted), and for each source round r' < r the
    # (positions in that sorted list, rows, columns in round r') of the slots' predecessors
    slot_rows: list[torch.Tensor]
    sources: list[list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]]
    latent_order: torch.Tensor  # (n,) gather index: round-order latents -> row-major latents
    n_slots: int
    schedule: str

    @property
    def computed_tokens(self) -> int:
        return self.src.shape[0] * sum(self.lengths)


# The fixed cost of one round in token positions, for the "auto" schedule (see self_latent_forward).
DEFAULT_ROUND_OVERHEAD = 1024.0
# With checkpointing the peak memory is the largest round's activations: smaller (packed) rounds.
CHECKPOINTED_ROUND_OVERHEAD = 16.0


def _aligned_schedule(n_real: list[int], slot_ranks: list[list[int]]) -> list[list[int]]:
    """Chunk r of every sample = its text from its (r-1)-th slot to its r-th slot (MIRAGE.md design)."""
    R = max(len(s) for s in slot_ranks) + 1
    out = [[0] * len(n_real) for _ in range(R)]
    for b, (n, sl) in enumerate(zip(n_real, slot_ranks)):
        cuts = [0, *sl, n]
        for r in range(len(cuts) - 1):
            out[r][b] = cuts[r + 1] - cuts[r]
    return out


def _packed_schedule(n_real: list[int], slot_ranks: list[list[int]], overhead: float) -> list[list[int]]:
    """Rounds chosen one at a time to keep the padded work low (slots still start their chunk).

    A chunk may end anywhere (the rounds are causal), but a slot can only be the first token of a
    chunk. Each round picks the length l (among the samples' distances to their next slot) that
    minimises (overhead + B x growth of the projected makespan) / useful tokens; a sample blocked
    by a slot before l just falls behind (its projected finish grows by the tokens it could not run).
    """
    import bisect

    B = len(n_real)
    pos = [0] * B
    finish = list(n_real)
    out: list[list[int]] = []
    while True:
        avail = {}
        for b in range(B):
            if pos[b] < n_real[b]:
                sl = slot_ranks[b]
                i = bisect.bisect_right(sl, pos[b])
                avail[b] = (sl[i] if i < len(sl) else n_real[b]) - pos[b]
        if not avail:
            return out
        M = max(finish)
        best = None
        for ell in sorted(set(avail.values())):
            grow = max([M] + [finish[b] + max(0, ell - a) for b, a in avail.items()]) - M
            work = sum(min(a, ell) for a in avail.values())
            score = (overhead + B * grow) / work
            if best is None or score < best[0]:
                best = (score, ell)
        ell = best[1]
        row = [0] * B
        for b, a in avail.items():
            row[b] = min(a, ell)
            pos[b] += row[b]
            finish[b] += ell - row[b]
        out.append(row)


def _cost(schedule: list[list[int]], overhead: float) -> float:
    B = len(schedule[0])
    return sum(B * max(r) + overhead for r in schedule)


def plan_rounds(
    attention_mask: torch.Tensor,
    slot_mask: torch.Tensor,
    schedule: str = "auto",
    round_overhead: float | None = None,
) -> RoundPlan:
    """Assign every real token of the batch to a round and a column.

    schedule "aligned": round r = each sample's r-th slot and its text up to the next slot (rounds =
    most slots + 1). "packed": rounds of any length chosen to cut padding (more rounds, less padded
    work). "auto": whichever has the lower cost B x sum(L_r) + round_overhead x rounds, where
    `round_overhead` is the fixed cost of one round in token positions.
    """
    attn = attention_mask.detach().to("cpu").bool()
    slots = slot_mask.detach().to("cpu").bool()
    if attn.shape != slots.shape:
        raise MirageError(
            f"slot_mask {tuple(slots.shape)} and attention_mask {tuple(attn.shape)} differ in shape"
        )
    if bool((slots & ~attn).any()):
        raise MirageError("slot_mask marks padding positions as latent slots")
    if round_overhead is None:
        round_overhead = DEFAULT_ROUND_OVERHEAD
    if schedule not in ("auto", "aligned", "packed"):
        raise MirageError(f"unknown round schedule {schedule!r}; choose auto, aligned or packed")
    B, L = attn.shape
    rank = attn.long().cumsum(1) - 1  # rank of each real token among its sample's real tokens
    n_real = attn.sum(1).tolist()
    slot_ranks = [rank[b][slots[b]].tolist() for b in range(B)]
    if any(sl and sl[0] == 0 for sl in slot_ranks):
        raise MirageError("a latent slot is the first token of its sequence: it has no previous hidden state")
    chosen = "aligned"
    table = _aligned_schedule(n_real, slot_ranks)
    if schedule != "aligned" and int(slots.sum()):
        best = None
        for factor in (0.25, 0.5, 1.0, 2.0, 4.0):
            cand = _packed_schedule(n_real, slot_ranks, round_overhead * factor)
            c = _cost(cand, round_overhead)
            if best is None or c < best[0]:
                best = (c, cand)
        if schedule == "packed" or best[0] < _cost(table, round_overhead):
            table, chosen = best[1], "packed"
    chunk = torch.tensor(table, dtype=torch.long).T  # (B, R) chunk lengths
    R = chunk.shape[1]
    lengths = chunk.max(0).values.tolist()
    offsets = torch.tensor([0] + lengths[:-1], dtype=torch.long).cumsum(0)
    chunk_start = chunk.cumsum(1) - chunk  # rank of each chunk's first token
    src = torch.zeros(B, sum(lengths), dtype=torch.long)
    valid = torch.zeros(B, sum(lengths), dtype=torch.bool)
    back = torch.zeros(B, L, dtype=torch.long)
    for b in range(B):  # vector ops per sample, no loop over tokens
        n = n_real[b]
        r_of = torch.repeat_interleave(torch.arange(R), chunk[b])  # round of each real token, by rank
        col = torch.arange(n) - chunk_start[b][r_of]
        flat = offsets[r_of] + col
        pos = attn[b].nonzero().flatten()
        src[b, flat] = pos
        valid[b, flat] = True
        back[b, pos] = flat
    # Slots: round and predecessor column, row-major order.
    sb, st = slots.nonzero(as_tuple=True)
    col_of_slot = back[sb, st]
    round_of_slot = torch.searchsorted(offsets, col_of_slot, right=True) - 1
    pred = back[sb, st - 1]
    pred_round = torch.searchsorted(offsets, pred, right=True) - 1
    pred_col = pred - offsets[pred_round]
    slot_rows, sources, order = [], [], []
    for r in range(R):
        sel = (round_of_slot == r).nonzero().flatten()  # already sorted by sample (row-major)
        slot_rows.append(sb[sel])
        groups = []
        for rp in pred_round[sel].unique().tolist():
            where_ = (pred_round[sel] == rp).nonzero().flatten()
            groups.append((rp, where_, sb[sel][where_], pred_col[sel][where_]))
        sources.append(groups)
        order.append(sel)
    round_major = torch.cat(order) if order else torch.zeros(0, dtype=torch.long)
    latent_order = torch.argsort(round_major)
    return RoundPlan(lengths, src, valid, back, slot_rows, sources, latent_order, int(slots.sum()), chosen)


def _round_mask(past_valid: torch.Tensor | None, valid_r: torch.Tensor, dtype) -> torch.Tensor:
    """Additive (B, 1, Lr, P + Lr) mask: valid past keys, causal valid keys of the round.

    A padded query also sees itself, so no row is fully masked (its output is never used).
    """
    B, Lr = valid_r.shape
    dev = valid_r.device
    causal = torch.ones(Lr, Lr, dtype=torch.bool, device=dev).tril()
    inner = causal[None] & valid_r[:, None, :]
    inner = inner | (torch.eye(Lr, dtype=torch.bool, device=dev)[None] & ~valid_r[:, :, None])
    if past_valid is not None and past_valid.shape[1]:
        allowed = torch.cat([past_valid[:, None, :].expand(B, Lr, -1), inner], dim=2)
    else:
        allowed = inner
    mask = torch.zeros(allowed.shape, dtype=dtype, device=dev)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


# --------------------------------------------------------------------------- public entry point


def self_latent_forward(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    slot_mask: torch.Tensor,
    *,
    position_ids: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    image_grid_thw: torch.Tensor | None = None,
    mm_token_type_ids: torch.Tensor | None = None,
    method: str = "auto",
    checkpoint: bool | None = None,
    detach_latents: bool = False,
    schedule: str = "auto",
    round_overhead: float | None = None,
) -> SelfLatentOutput:
    """Final-norm hidden states of a batch whose latent slots carry self-generated latents.

    `slot_mask` (bool, B x L) marks the `<|latent_pad|>` positions; the input at slot t is the
    final-norm hidden state at t-1 of the same sample in this same pass. Left or right padding.
    Images (if any) must lie before each sample's first slot (they run in round 0).
    `position_ids` (3, B, L) default to the model's rope positions of the full sequences.
    `checkpoint`: True/False overrides the model's own checkpointing flag when `method="auto"`.
    `detach_latents=True` cuts the gradient through the latents (for ablations and tests).
    `schedule` / `round_overhead`: how the round methods cut the batch into rounds (see `plan_rounds`);
    by default "rounds" keeps the aligned schedule unless packing saves far more (a round costs 1024
    token positions in the estimate): on a 2-core CPU 54 small packed rounds ran slower than 13
    padded aligned ones (docs/benchmarks.md), and on an accelerator a round's kernel launches cost
    more still. "rounds_checkpointed" packs (16 positions a round): its peak memory is the largest
    round's activations, and a user who turned checkpointing on chose memory over time.
    """
    resolved = resolve_method(model, method)
    if method == "auto" and checkpoint is not None:
        resolved = "rounds_checkpointed" if checkpoint else "rounds"
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    slot_mask = slot_mask.bool()
    if position_ids is None:
        position_ids = rope_positions(model, input_ids, attention_mask, mm_token_type_ids, image_grid_thw)
    if position_ids.ndim == 2:
        position_ids = position_ids[None].expand(3, -1, -1)
    vision = dict(pixel_values=pixel_values, image_grid_thw=image_grid_thw)
    if resolved == "recompute":
        return _recompute(
            model,
            input_ids,
            attention_mask,
            slot_mask,
            position_ids,
            vision,
            mm_token_type_ids,
            detach_latents,
        )
    if round_overhead is None:
        round_overhead = (
            CHECKPOINTED_ROUND_OVERHEAD if resolved == "rounds_checkpointed" else DEFAULT_ROUND_OVERHEAD
        )
    global _warned_forced_rounds
    off = contextlib.nullcontext()
    if resolved == "rounds" and is_checkpointing(model):
        if not _warned_forced_rounds:
            logger.warning(
                "stage 2: method 'rounds' needs the KV cache, which gradient checkpointing disables; "
                "the model's gradient checkpointing is switched off for these calls "
                "(use 'rounds_checkpointed' or 'auto' to keep memory low)"
            )
            _warned_forced_rounds = True
        off = model_checkpointing_off(model)
    with off:
        return _rounds(
            model,
            input_ids,
            attention_mask,
            slot_mask,
            position_ids,
            vision,
            mm_token_type_ids,
            checkpointed=resolved == "rounds_checkpointed",
            detach_latents=detach_latents,
            schedule=schedule,
            round_overhead=round_overhead,
        )


# --------------------------------------------------------------------------- rounds


def _inner_forward(inner, **kw) -> torch.Tensor:
    return inner(**kw).last_hidden_state


def _rounds(
    model,
    input_ids,
    attention_mask,
    slot_mask,
    position_ids,
    vision,
    mm_token_type_ids,
    *,
    checkpointed: bool,
    detach_latents: bool,
    schedule: str = "auto",
    round_overhead: float | None = None,
) -> SelfLatentOutput:
    from transformers import DynamicCache

    plan = plan_rounds(attention_mask, slot_mask, schedule, round_overhead)
    inner = multimodal_model(model)
    config = unwrap(model).config
    dev = input_ids.device
    dtype = model.get_input_embeddings().weight.dtype
    B = input_ids.shape[0]
    src = plan.src.to(dev)
    valid = plan.valid.to(dev)
    n_layers = None

    cache = None if checkpointed else DynamicCache(config=config)
    past_k: list[list[torch.Tensor]] = []  # per layer: chunks, one per round (checkpointed path)
    past_v: list[list[torch.Tensor]] = []
    past_valid = None
    hiddens: list[torch.Tensor] = []
    latents_round_order: list[torch.Tensor] = []
    off = 0
    for r, Lr in enumerate(plan.lengths):
        src_r = src[:, off : off + Lr]
        valid_r = valid[:, off : off + Lr]
        off += Lr
        ids_r = input_ids.gather(1, src_r)
        pos_r = position_ids.gather(2, src_r[None].expand(position_ids.shape[0], -1, -1))
        mask_r = _round_mask(past_valid, valid_r, dtype)
        slot_r = torch.zeros(B, Lr, dtype=torch.bool, device=dev)
        values = None
        rows = plan.slot_rows[r]
        if len(rows):
            slot_r[rows.to(dev), 0] = True
            parts, where_ = [], []
            for rp, idx, prow, pcol in plan.sources[r]:
                parts.append(hiddens[rp][prow.to(dev), pcol.to(dev)])
                where_.append(idx)
            values = torch.cat(parts) if len(parts) > 1 else parts[0]
            if len(parts) > 1:  # back to sample order
                values = values[torch.argsort(torch.cat(where_)).to(dev)]
            if detach_latents:
                values = values.detach()
            latents_round_order.append(values)
        extra = {}
        if r == 0:
            extra = {k: v for k, v in vision.items() if v is not None}
            if mm_token_type_ids is not None and extra:
                extra["mm_token_type_ids"] = mm_token_type_ids.gather(1, src_r)
        if not checkpointed:
            with latent_inputs(model, slot_r, values):
                h = _inner_forward(
                    inner,
                    input_ids=ids_r,
                    attention_mask=mask_r,
                    position_ids=pos_r,
                    cache=cache,
                    use_cache=True,
                    **extra,
                )
        else:
            n_past = sum(c.shape[2] for c in past_k[0]) if past_k else 0
            flat_past = [c for layer in past_k for c in layer] + [c for layer in past_v for c in layer]
            n_chunks = len(past_k[0]) if past_k else 0
            out = torch.utils.checkpoint.checkpoint(
                _checkpointed_round,
                model,
                inner,
                config,
                ids_r,
                pos_r,
                mask_r,
                slot_r,
                values,
                extra,
                n_past,
                n_chunks,
                *flat_past,
                use_reentrant=False,
            )
            h = out[0]
            n_layers = (len(out) - 1) // 2
            new_k, new_v = out[1 : 1 + n_layers], out[1 + n_layers :]
            if not past_k:
                past_k = [[] for _ in range(n_layers)]
                past_v = [[] for _ in range(n_layers)]
            for i in range(n_layers):
                past_k[i].append(new_k[i])
                past_v[i].append(new_v[i])
        hiddens.append(h)
        past_valid = valid_r if past_valid is None else torch.cat([past_valid, valid_r], dim=1)

    all_h = torch.cat(hiddens, dim=1) if len(hiddens) > 1 else hiddens[0]
    D = all_h.shape[-1]
    back = plan.back.to(dev)
    hidden = all_h.gather(1, back[..., None].expand(-1, -1, D))
    hidden = hidden * attention_mask.to(hidden.dtype)[..., None]
    if latents_round_order:
        latents = torch.cat(latents_round_order)[plan.latent_order.to(dev)]
    else:
        latents = all_h.new_zeros(0, D)
    return SelfLatentOutput(
        hidden,
        latents,
        "rounds_checkpointed" if checkpointed else "rounds",
        len(plan.lengths),
        plan.computed_tokens,
        plan.schedule,
    )


def _checkpointed_round(
    model, inner, config, ids_r, pos_r, mask_r, slot_r, values, extra, n_past, n_chunks, *flat_past
):
    """One round as a pure function: past key/value chunks in, (hidden, new keys..., new values...) out."""
    from transformers import DynamicCache

    if n_chunks:
        n_layers = len(flat_past) // (2 * n_chunks)
        ks = [torch.cat(flat_past[i * n_chunks : (i + 1) * n_chunks], dim=2) for i in range(n_layers)]
        vbase = n_layers * n_chunks
        vs = [
            torch.cat(flat_past[vbase + i * n_chunks : vbase + (i + 1) * n_chunks], dim=2)
            for i in range(n_layers)
        ]
        cache = DynamicCache(ddp_cache_data=list(zip(ks, vs)), config=config)
    else:
        cache = DynamicCache(config=config)
    # The model's own checkpointing would drop the cache; it is off here, also in the backward replay.
    with model_checkpointing_off(model), latent_inputs(model, slot_r, values):
        h = _inner_forward(
            inner,
            input_ids=ids_r,
            attention_mask=mask_r,
            position_ids=pos_r,
            cache=cache,
            use_cache=True,
            **extra,
        )
    layers = cache.layers
    if n_past:
        new_k = [layer.keys[:, :, n_past:].clone() for layer in layers]
        new_v = [layer.values[:, :, n_past:].clone() for layer in layers]
    else:
        new_k = [layer.keys for layer in layers]
        new_v = [layer.values for layer in layers]
    return (h, *new_k, *new_v)


# --------------------------------------------------------------------------- recompute


def _recompute(
    model, input_ids, attention_mask, slot_mask, position_ids, vision, mm_token_type_ids, detach_latents
) -> SelfLatentOutput:
    inner = multimodal_model(model)
    B, L = input_ids.shape
    counts = slot_mask.sum(1).cpu()  # one host sync per batch
    passes = int(counts.max()) + 1 if B else 1
    n = int(counts.sum())
    prev = torch.zeros_like(slot_mask)
    prev[:, :-1] = slot_mask[:, 1:]  # position t-1 of every slot t, same row-major order
    extra = {k: v for k, v in vision.items() if v is not None}
    if mm_token_type_ids is not None and extra:
        extra["mm_token_type_ids"] = mm_token_type_ids
    D = model.get_input_embeddings().weight.shape[1]
    values = torch.zeros(n, D, dtype=model.get_input_embeddings().weight.dtype, device=input_ids.device)
    hidden = None
    for i in range(passes):
        with latent_inputs(model, slot_mask, values):
            hidden = _inner_forward(
                inner, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **extra
            )
        if i < passes - 1:
            values = hidden[prev]
            if detach_latents:
                values = values.detach()
    hidden = hidden * attention_mask.to(hidden.dtype)[..., None]
    return SelfLatentOutput(hidden, values, "recompute", passes, B * L * passes, "full")
