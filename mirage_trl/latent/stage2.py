"""Stage 2: one forward in which every latent slot is fed the model's own previous hidden state.

`self_latent_forward` returns the final-norm hidden states of a batch in which the input
embedding at each latent slot t is the final-norm hidden state at position t-1 of the same
sample, computed in the same pass, with gradients through every latent. A sample with m slots
needs m+1 dependent steps; every sample has its own slots (positions and count).

Methods (all exact; they differ in cost and in how they live with gradient checkpointing):

- ``"rounds"``: the batch runs in R = (most slots in a sample) + 1 rounds over one grad-carrying
  `DynamicCache`. Round 0 holds each sample's tokens before its first slot; round r holds its
  r-th slot (fed with its own last hidden state of round r-1) and the text up to its next slot.
  A round's tokens run packed in one row, sample after sample, so the linear layers (most of
  the work) compute exactly the real tokens; only attention regroups them per sample, padded,
  against each sample's own cached keys (`rounds_attention`, switched on for the rounds only).
  Rope positions are gathered from the full-sequence positions. About one forward of compute.
- ``"rounds_checkpointed"``: the same rounds, each wrapped in
  ``torch.utils.checkpoint.checkpoint(use_reentrant=False)`` as a pure function of
  (round inputs, past key/value chunks) -> (hidden states, the round's new keys/values); the
  cache object is built fresh inside, and the model's own gradient checkpointing is switched off
  inside the function (also during the backward replay) because HF checkpointing drops the
  cache. Memory: per round only its inputs and keys/values are kept, plus the activations of
  the round being replayed; so the rounds are cut to at most (real tokens / layers) tokens each
  ("split" schedule), which keeps that peak near the per-layer checkpointing of stage 1.
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
import contextvars
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
    computed_tokens: token positions the linear layers ran: the real tokens for the round methods
        (rounds run packed), B x L x passes for recompute (padding included).
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

    @property
    def padded_tokens(self) -> int:
        """B x sum(W_r): what a padded (one row per sample) round layout would compute."""
        return self.batch_size * sum(self.lengths)


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
) -> RoundPlan:
    """Assign every real token of the batch to a round, and lay each round out packed.

    "aligned": round r = each sample's r-th slot and its text up to the next slot (rounds = most slots
    + 1), the fewest dependent rounds. "split": the aligned rounds with any round of more than
    `max_round_tokens` real tokens cut into equal rounds (more rounds, a smaller largest round: what
    per-round checkpointing keeps in memory). "auto": "split" when `max_round_tokens` is given and
    some round exceeds it, else "aligned". Every round runs its real tokens packed in one row, so no
    schedule computes padding in the linear layers. `keep_together` (B, L) bool marks tokens (the
    image tokens) that must all run in the first round.
    """
    attn = attention_mask.detach().to("cpu").bool()
    slots = slot_mask.detach().to("cpu").bool()
    if attn.shape != slots.shape:
        raise MirageError(
            f"slot_mask {tuple(slots.shape)} and attention_mask {tuple(attn.shape)} differ in shape"
        )
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
    first_min = None
    if keep_together is not None:
        kt = keep_together.detach().to("cpu").bool() & attn
        first_min = torch.where(kt, rank + 1, 0).max(1).values.tolist()  # rank of the last one + 1
        for b, (m, sl) in enumerate(zip(first_min, slot_ranks)):
            if sl and m > sl[0]:
                raise MirageError(
                    f"sample {b}: an image comes after its first latent slot (token {sl[0]}); "
                    "images must come before the first <|latent_start|> span"
                )
    chosen = "aligned"
    table = _aligned_schedule(n_real, slot_ranks)
    if schedule == "split" and max_round_tokens is None:
        raise MirageError('schedule "split" needs max_round_tokens')
    if schedule != "aligned" and max_round_tokens is not None:
        if schedule == "split" or max(sum(row) for row in table) > max_round_tokens:
            first_min = None
            if keep_together is not None:
                kt = keep_together.detach().to("cpu").bool() & attn
                last = torch.where(kt, rank + 1, 0).max(1).values  # rank of the last such token + 1
                first_min = last.tolist()
                if any(m > (sl[0] if sl else n) for m, sl, n in zip(first_min, slot_ranks, n_real)):
                    raise MirageError(
                        "an image lies after a latent slot: images must come before the first span"
                    )
            table, chosen = _split_schedule(table, max_round_tokens, first_min), "split"
    chunk = torch.tensor(table, dtype=torch.long).T  # (B, R) chunk lengths
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
    latent_order = torch.argsort(round_major)
    return RoundPlan(chunk.max(0).values.tolist(), tokens.tolist(), rounds, back, latent_order, chosen, B)


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


def _round_mask(layout: RoundLayout) -> torch.Tensor:
    """(B, 1, W_r, K_r) bool: a query sees its sample's keys of rank <= its own (padding sees key 0)."""
    B = layout.q_rank.shape[0]
    K = layout.k_index.numel() // B
    ranks = torch.arange(K, device=layout.q_rank.device)
    return (ranks[None, None, :] <= layout.q_rank[:, :, None])[:, None]


@contextlib.contextmanager
def packed_round(inner, layout: RoundLayout, mask: torch.Tensor):
    """Run the language model with `rounds_attention` for one round, then restore its implementation."""
    _register_rounds_attention()
    config = inner.language_model.config
    before = config._attn_implementation_internal
    config._attn_implementation_internal = ROUNDS_ATTENTION
    token = _ACTIVE_ROUND.set((layout, mask))
    try:
        yield
    finally:
        _ACTIVE_ROUND.reset(token)
        config._attn_implementation_internal = before


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
    max_round_tokens: int | None = None,
    feedback=None,
) -> SelfLatentOutput:
    """Final-norm hidden states of a batch whose latent slots carry self-generated latents.

    `slot_mask` (bool, B x L) marks the `<|latent_pad|>` positions; the input at slot t is the
    final-norm hidden state at t-1 of the same sample in this same pass. Left or right padding.
    Images (if any) must lie before each sample's first slot (they run in round 0).
    `position_ids` (3, B, L) default to the model's rope positions of the full sequences.
    `checkpoint`: True/False overrides the model's own checkpointing flag when `method="auto"`.
    `detach_latents=True` cuts the gradient through the latents (for ablations and tests).
    `schedule` / `max_round_tokens`: how the round methods cut the batch into rounds (see
    `plan_rounds`). "rounds" takes the aligned schedule (fewest rounds). "rounds_checkpointed"
    keeps each round to `max_round_tokens` real tokens, by default the batch's real tokens / the
    number of layers: its peak memory is the replayed round's activations over every layer.
    `feedback`: a `latent.feedback.LatentFeedback` applied to each hidden state before it is fed
    (default: the model's saved slot settings); `latents` are the vectors actually fed.
    """
    if feedback is None:
        from .feedback import LatentFeedback

        feedback = LatentFeedback.from_model(model)
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
            feedback,
        )
    if max_round_tokens is None and resolved == "rounds_checkpointed":
        config = unwrap(model).config
        layers = getattr(getattr(config, "text_config", config), "num_hidden_layers", 1)
        max_round_tokens = max(1, -(-int(attention_mask.sum()) // layers))
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
            max_round_tokens=max_round_tokens,
            feedback=feedback,
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
    max_round_tokens: int | None = None,
    feedback=None,
) -> SelfLatentOutput:
    from transformers import DynamicCache

    images = None
    if vision.get("pixel_values") is not None:
        if mm_token_type_ids is not None:
            images = mm_token_type_ids != 0
        else:
            cfg = unwrap(model).config
            ids = [getattr(cfg, k, None) for k in ("image_token_id", "video_token_id")]
            images = torch.isin(
                input_ids, torch.tensor([i for i in ids if i is not None], device=input_ids.device)
            )
    plan = plan_rounds(attention_mask, slot_mask, schedule, max_round_tokens, keep_together=images)
    inner = multimodal_model(model)
    config = unwrap(model).config
    dev = input_ids.device
    flat_ids = input_ids.reshape(-1)
    flat_pos = position_ids.reshape(position_ids.shape[0], -1)
    flat_mm = mm_token_type_ids.reshape(-1) if mm_token_type_ids is not None else None

    cache = None if checkpointed else DynamicCache(config=config)
    past_k: list[list[torch.Tensor]] = []  # per layer: chunks, one per round (checkpointed path)
    past_v: list[list[torch.Tensor]] = []
    hiddens: list[torch.Tensor] = []  # per round: (T_r, D) packed
    latents_round_order: list[torch.Tensor] = []
    # Every round's index tensors go to the device before any round runs: a copy from pageable host
    # memory waits for the stream, so copying per round would stall the GPU queue between rounds.
    layouts = [layout.to(dev) for layout in plan.rounds]
    for r, layout in enumerate(layouts):
        ids_r = flat_ids[layout.src][None]
        pos_r = flat_pos[:, layout.src][:, None]
        mask_r = _round_mask(layout)
        slot_r = None
        values = None
        if len(layout.slot_local):
            slot_r = torch.zeros_like(ids_r, dtype=torch.bool)
            slot_r[0, layout.slot_local] = True
            parts = [hiddens[rp][col] for rp, _, col in layout.sources]
            values = torch.cat(parts) if len(parts) > 1 else parts[0]
            if len(parts) > 1:  # back to sample order
                values = values[torch.argsort(torch.cat([w for _, w, _ in layout.sources]))]
            if not feedback.is_identity:
                values = feedback(values)
            if detach_latents:
                values = values.detach()
            latents_round_order.append(values)
        extra = {}
        if r == 0:
            extra = {k: v for k, v in vision.items() if v is not None}
            if flat_mm is not None and extra:
                extra["mm_token_type_ids"] = flat_mm[layout.src][None]
        if not checkpointed:
            with latent_inputs(model, slot_r, values), packed_round(inner, layout, mask_r):
                h = _inner_forward(
                    inner, input_ids=ids_r, position_ids=pos_r, cache=cache, use_cache=True, **extra
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
                layout,
                mask_r,
                ids_r,
                pos_r,
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
        hiddens.append(h[0])

    all_h = torch.cat(hiddens) if len(hiddens) > 1 else hiddens[0]
    hidden = all_h[plan.back.to(dev)]
    hidden = hidden * attention_mask.to(hidden.dtype)[..., None]
    if latents_round_order:
        latents = torch.cat(latents_round_order)[plan.latent_order.to(dev)]
    else:
        latents = all_h.new_zeros(0, all_h.shape[-1])
    return SelfLatentOutput(
        hidden,
        latents,
        "rounds_checkpointed" if checkpointed else "rounds",
        len(plan.rounds),
        plan.computed_tokens,
        plan.schedule,
    )


def _checkpointed_round(
    model, inner, config, layout, mask_r, ids_r, pos_r, slot_r, values, extra, n_past, n_chunks, *flat_past
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
    # The model's own checkpointing would drop the cache; it is off here, also in the backward replay
    # (which also needs the packed-round attention switched on again).
    with (
        model_checkpointing_off(model),
        latent_inputs(model, slot_r, values),
        packed_round(inner, layout, mask_r),
    ):
        h = _inner_forward(inner, input_ids=ids_r, position_ids=pos_r, cache=cache, use_cache=True, **extra)
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
    model,
    input_ids,
    attention_mask,
    slot_mask,
    position_ids,
    vision,
    mm_token_type_ids,
    detach_latents,
    feedback,
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
            values = feedback(hidden[prev])
            if detach_latents:
                values = values.detach()
    hidden = hidden * attention_mask.to(hidden.dtype)[..., None]
    return SelfLatentOutput(hidden, values, "recompute", passes, B * L * passes, "full")
