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

    lengths: list[int]  # round lengths L_r (padded to the round's longest segment)
    src: torch.Tensor  # (B, sum L_r) position in the padded sequence of each round column (0 for padding)
    valid: torch.Tensor  # (B, sum L_r) bool, real token
    back: torch.Tensor  # (B, L) column (in the concatenated rounds) of each sequence position (0 for padding)
    slot_rows: list[torch.Tensor]  # per round r >= 1: samples that have a slot at column 0 of round r
    prev_last: list[torch.Tensor]  # per round r >= 1: for those samples, their last column in round r-1
    latent_order: torch.Tensor  # (n,) gather index: round-order latents -> row-major latents
    n_slots: int


def plan_rounds(attention_mask: torch.Tensor, slot_mask: torch.Tensor) -> RoundPlan:
    """Split every sample into segments that start at its slots; segment r of each sample goes to round r."""
    attn = attention_mask.detach().to("cpu").bool()
    slots = slot_mask.detach().to("cpu").bool()
    if attn.shape != slots.shape:
        raise MirageError(f"slot_mask {tuple(slots.shape)} and attention_mask {tuple(attn.shape)} differ in shape")
    if bool((slots & ~attn).any()):
        raise MirageError("slot_mask marks padding positions as latent slots")
    B, L = attn.shape
    rank = attn.long().cumsum(1) - 1  # rank of each real token among the sample's real tokens
    seg = slots.long().cumsum(1)  # segment (= round) of each token: slots at or before it
    counts = slots.sum(1)  # slots per sample
    R = int(counts.max()) + 1 if B else 1
    # Real-rank of each segment's first token: 0 for segment 0, the slot's rank for segment s >= 1.
    seg_start = torch.zeros(B, R, dtype=torch.long)
    b_idx, t_idx = slots.nonzero(as_tuple=True)  # row-major
    seg_start[b_idx, seg[b_idx, t_idx]] = rank[b_idx, t_idx]
    if bool((rank[b_idx, t_idx] == 0).any()):
        raise MirageError("a latent slot is the first token of its sequence: it has no previous hidden state")
    col = rank - seg_start.gather(1, seg.clamp(max=R - 1))  # column inside the round
    seg_len = torch.zeros(B, R, dtype=torch.long)
    seg_len.scatter_add_(1, seg * attn, attn.long())
    lengths = seg_len.max(0).values.tolist()
    offsets = torch.tensor([0] + lengths[:-1]).cumsum(0)
    flat = offsets[seg.clamp(max=R - 1)] + col  # (B, L) column in the concatenated rounds
    total = sum(lengths)
    src = torch.zeros(B, total, dtype=torch.long)
    valid = torch.zeros(B, total, dtype=torch.bool)
    rb, rt = attn.nonzero(as_tuple=True)
    src[rb, flat[rb, rt]] = rt
    valid[rb, flat[rb, rt]] = True
    back = torch.where(attn, flat, torch.zeros_like(flat))
    slot_rows, prev_last = [], []
    for r in range(1, R):
        rows = (counts >= r).nonzero(as_tuple=True)[0]
        slot_rows.append(rows)
        prev_last.append(seg_len[rows, r - 1] - 1)
    # Latents are produced round by round (round r: rows with >= r slots, in sample order).
    # Row-major index of (sample b, slot j) is first[b] + j.
    first = torch.cumsum(counts, 0) - counts
    round_major = torch.cat([first[rows] + (r - 1) for r, rows in enumerate(slot_rows, start=1)]) if slot_rows else (
        torch.zeros(0, dtype=torch.long))
    latent_order = torch.argsort(round_major)
    return RoundPlan(lengths, src, valid, back, slot_rows, prev_last, latent_order, int(counts.sum()))


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
) -> SelfLatentOutput:
    """Final-norm hidden states of a batch whose latent slots carry self-generated latents.

    `slot_mask` (bool, B x L) marks the `<|latent_pad|>` positions; the input at slot t is the
    final-norm hidden state at t-1 of the same sample in this same pass. Left or right padding.
    Images (if any) must lie before each sample's first slot (they run in round 0).
    `position_ids` (3, B, L) default to the model's rope positions of the full sequences.
    `checkpoint`: True/False overrides the model's own checkpointing flag when `method="auto"`.
    `detach_latents=True` cuts the gradient through the latents (for ablations and tests).
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
        return _recompute(model, input_ids, attention_mask, slot_mask, position_ids, vision, mm_token_type_ids,
                          detach_latents)
    global _warned_forced_rounds
    off = contextlib.nullcontext()
    if resolved == "rounds" and is_checkpointing(model):
        if not _warned_forced_rounds:
            logger.warning("stage 2: method 'rounds' needs the KV cache, which gradient checkpointing disables; "
                           "the model's gradient checkpointing is switched off for these calls "
                           "(use 'rounds_checkpointed' or 'auto' to keep memory low)")
            _warned_forced_rounds = True
        off = model_checkpointing_off(model)
    with off:
        return _rounds(model, input_ids, attention_mask, slot_mask, position_ids, vision, mm_token_type_ids,
                       checkpointed=resolved == "rounds_checkpointed", detach_latents=detach_latents)


# --------------------------------------------------------------------------- rounds


def _inner_forward(inner, **kw) -> torch.Tensor:
    return inner(**kw).last_hidden_state


def _rounds(model, input_ids, attention_mask, slot_mask, position_ids, vision, mm_token_type_ids, *,
            checkpointed: bool, detach_latents: bool) -> SelfLatentOutput:
    from transformers import DynamicCache

    plan = plan_rounds(attention_mask, slot_mask)
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
        src_r = src[:, off:off + Lr]
        valid_r = valid[:, off:off + Lr]
        off += Lr
        ids_r = input_ids.gather(1, src_r)
        pos_r = position_ids.gather(2, src_r[None].expand(position_ids.shape[0], -1, -1))
        mask_r = _round_mask(past_valid, valid_r, dtype)
        slot_r = torch.zeros(B, Lr, dtype=torch.bool, device=dev)
        values = None
        if r >= 1:
            rows = plan.slot_rows[r - 1].to(dev)
            slot_r[rows, 0] = True
            values = hiddens[-1][rows, plan.prev_last[r - 1].to(dev)]
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
                h = _inner_forward(inner, input_ids=ids_r, attention_mask=mask_r, position_ids=pos_r,
                                   cache=cache, use_cache=True, **extra)
        else:
            n_past = sum(c.shape[2] for c in past_k[0]) if past_k else 0
            flat_past = [c for layer in past_k for c in layer] + [c for layer in past_v for c in layer]
            n_chunks = len(past_k[0]) if past_k else 0
            out = torch.utils.checkpoint.checkpoint(
                _checkpointed_round, model, inner, config, ids_r, pos_r, mask_r, slot_r, values, extra,
                n_past, n_chunks, *flat_past, use_reentrant=False,
            )
            h = out[0]
            n_layers = (len(out) - 1) // 2
            new_k, new_v = out[1:1 + n_layers], out[1 + n_layers:]
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
    return SelfLatentOutput(hidden, latents, "rounds_checkpointed" if checkpointed else "rounds",
                            len(plan.lengths), B * sum(plan.lengths))


def _checkpointed_round(model, inner, config, ids_r, pos_r, mask_r, slot_r, values, extra, n_past, n_chunks,
                        *flat_past):
    """One round as a pure function: past key/value chunks in, (hidden, new keys..., new values...) out."""
    from transformers import DynamicCache

    if n_chunks:
        n_layers = len(flat_past) // (2 * n_chunks)
        ks = [torch.cat(flat_past[i * n_chunks:(i + 1) * n_chunks], dim=2) for i in range(n_layers)]
        vbase = n_layers * n_chunks
        vs = [torch.cat(flat_past[vbase + i * n_chunks: vbase + (i + 1) * n_chunks], dim=2) for i in range(n_layers)]
        cache = DynamicCache(ddp_cache_data=list(zip(ks, vs)), config=config)
    else:
        cache = DynamicCache(config=config)
    # The model's own checkpointing would drop the cache; it is off here, also in the backward replay.
    with model_checkpointing_off(model), latent_inputs(model, slot_r, values):
        h = _inner_forward(inner, input_ids=ids_r, attention_mask=mask_r, position_ids=pos_r, cache=cache,
                           use_cache=True, **extra)
    layers = cache.layers
    if n_past:
        new_k = [layer.keys[:, :, n_past:].clone() for layer in layers]
        new_v = [layer.values[:, :, n_past:].clone() for layer in layers]
    else:
        new_k = [layer.keys for layer in layers]
        new_v = [layer.values for layer in layers]
    return (h, *new_k, *new_v)


# --------------------------------------------------------------------------- recompute


def _recompute(model, input_ids, attention_mask, slot_mask, position_ids, vision, mm_token_type_ids,
               detach_latents) -> SelfLatentOutput:
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
            hidden = _inner_forward(inner, input_ids=input_ids, attention_mask=attention_mask,
                                    position_ids=position_ids, **extra)
        if i < passes - 1:
            values = hidden[prev]
            if detach_latents:
                values = values.detach()
    hidden = hidden * attention_mask.to(hidden.dtype)[..., None]
    return SelfLatentOutput(hidden, values, "recompute", passes, B * L * passes)
