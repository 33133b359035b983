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
  ``"rounds"``. Models with linear-attention (recurrent) layers such as Qwen3.5 run the same rounds: their
  gated-delta layers take each round per sample, from the recurrent and convolution states the sample's
  earlier rounds left (`latent.recurrent_rounds`; in the checkpointed rounds those states are inputs and
  outputs of each checkpointed round).

Forcing ``"rounds"`` while the model has gradient checkpointing on is allowed: the model's
checkpointing is switched off for that call (a warning is logged once) so the cache path stays
exact; it is never run with checkpointing on (that is how the reference gives wrong gradients).

Latents always enter through `slots.latent_inputs` (the one slot-filling mechanism).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.utils.checkpoint

from ..errors import MirageError
from ..models.families import cache_kwargs, family, is_partitioned, multimodal_model, unwrap
from .bottleneck import blind_queries, check_bottleneck_support, visual_bottleneck
from .feedback import LatentFeedback
from .recurrent_rounds import RecurrentStates, recurrent_layers, recurrent_round
from .rounds import by_rank, packed_round, plan_rounds, round_mask, without_blind_pairs
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


# --------------------------------------------------------------------------- public entry point


def self_latent_forward(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    slot_mask: torch.Tensor,
    *,
    position_ids: torch.Tensor | None = None,
    method: str = "auto",
    checkpoint: bool | None = None,
    detach_latents: bool = False,
    schedule: str = "auto",
    max_round_tokens: int | None = None,
    feedback=None,
    bottleneck: str = "none",
    **vision,
) -> SelfLatentOutput:
    """Final-norm hidden states of a batch whose latent slots carry self-generated latents.

    `slot_mask` (bool, B x L) marks the `<|latent_pad|>` positions; the input at slot t is the
    final-norm hidden state at t-1 of the same sample in this same pass. Left or right padding.
    Images (if any) must lie before each sample's first slot (they run in round 0).
    `vision`: the batch's image inputs as the model takes them (`pixel_values`, `image_grid_thw`,
    `mm_token_type_ids` for Qwen-VL; `models.families`); None values are left out.
    `position_ids` ((rows,) B, L) default to the model's own positions of the full sequences.
    `checkpoint`: True/False overrides the model's own checkpointing flag when `method="auto"`.
    `detach_latents=True` cuts the gradient through the latents (for ablations and tests).
    `schedule` / `max_round_tokens`: how the round methods cut the batch into rounds (see
    `plan_rounds`). "rounds" takes the aligned schedule (fewest rounds). "rounds_checkpointed"
    keeps each round to `max_round_tokens` real tokens, by default the batch's real tokens / the
    number of layers: its peak memory is the replayed round's activations over every layer.
    `feedback`: a `latent.feedback.LatentFeedback` applied to each hidden state before it is fed
    (default: the model's saved slot settings); `latents` are the vectors actually fed.
    `bottleneck`: "image" or "strict" runs under that visual bottleneck (`latent.bottleneck`), every method.
    """
    if feedback is None:
        feedback = LatentFeedback.from_model(model)
    if bottleneck != "none":
        check_bottleneck_support(model)
    resolved = resolve_method(model, method)
    if method == "auto" and checkpoint is not None and resolved != "recompute":
        resolved = "rounds_checkpointed" if checkpoint else "rounds"
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    slot_mask = slot_mask.bool()
    fam = family(model)
    vision = {k: v for k, v in vision.items() if v is not None}
    unknown = set(vision) - {*fam.vision_keys, *fam.token_keys}
    if unknown:
        raise MirageError(f"stage 2: {fam.name} takes no input {', '.join(sorted(unknown))}")
    if position_ids is None:
        position_ids = fam.position_ids(model, input_ids, attention_mask, vision)
    if position_ids.ndim == 2:  # (B, L): the same positions in every row the family's positions have
        position_ids = position_ids[None].expand(fam.position_rows, -1, -1)
    batch = _Batch(input_ids, attention_mask, slot_mask, position_ids, vision, bottleneck)
    if resolved == "recompute":
        return _recompute(model, batch, detach_latents, feedback)
    tokens_per_layer = None  # the checkpointing default cap: real tokens / layers, counted by the planner
    if max_round_tokens is None and resolved == "rounds_checkpointed":
        config = unwrap(model).config
        tokens_per_layer = getattr(getattr(config, "text_config", config), "num_hidden_layers", 1)
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
            batch,
            checkpointed=resolved == "rounds_checkpointed",
            detach_latents=detach_latents,
            schedule=schedule,
            max_round_tokens=max_round_tokens,
            tokens_per_layer=tokens_per_layer,
            feedback=feedback,
        )


class _Batch(NamedTuple):
    """The inputs of one stage-2 forward, as both methods take them."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    slot_mask: torch.Tensor
    position_ids: torch.Tensor  # (rows, B, L): the family's position layout
    vision: dict  # the image inputs and their per-token companions (family.image_inputs)
    bottleneck: str = "none"  # the visual bottleneck's mode


# --------------------------------------------------------------------------- rounds


def _inner_forward(inner, **kw) -> torch.Tensor:
    return inner(**kw).last_hidden_state


def _rounds(
    model,
    batch: _Batch,
    *,
    checkpointed: bool,
    detach_latents: bool,
    schedule: str = "auto",
    max_round_tokens: int | None = None,
    tokens_per_layer: int | None = None,
    feedback=None,
    **vision,
) -> SelfLatentOutput:
    input_ids, attention_mask, slot_mask, position_ids, vision, bottleneck = batch

    # 1. Plan the rounds: which tokens of which sample each round runs, images kept whole in round 0.
    fam = family(model)
    per_token = {k: v for k, v in vision.items() if k in fam.token_keys}
    images_in = {k: v for k, v in vision.items() if k in fam.vision_keys}
    images = fam.image_mask(model, input_ids) if images_in else None
    cap = dict(keep_together=images, tokens_per_layer=tokens_per_layer)
    plan = plan_rounds(attention_mask, slot_mask, schedule, max_round_tokens, **cap)
    most = rounds_across_ranks(model, len(plan.rounds), input_ids.device)
    if most > len(plan.rounds):
        plan = plan_rounds(attention_mask, slot_mask, schedule, max_round_tokens, min_rounds=most, **cap)
    blocks = fam.attention_blocks(model, input_ids) if images_in else None
    rank_blocks = by_rank(blocks, attention_mask, -1) if blocks is not None else None
    blind = None
    if bottleneck != "none" and images is not None:  # (blind queries, image keys) by rank
        blind_q = blind_queries(slot_mask, images, bottleneck)
        blind = (by_rank(blind_q, attention_mask, False), by_rank(images, attention_mask, False))
    inner = multimodal_model(model)
    dev = input_ids.device
    flat_ids = input_ids.reshape(-1)
    flat_pos = position_ids.reshape(position_ids.shape[0], -1)
    flat_tokens = {k: v.reshape(-1) for k, v in per_token.items()}

    # 2. Run them in order: round r's latent slots take the hidden states rounds before it computed.
    run_round = (_CheckpointedRounds if checkpointed else _CachedRounds)(model, inner, plan.batch_size)
    hiddens: list[torch.Tensor] = []  # per round: (T_r, D) packed
    latents_round_order: list[torch.Tensor] = []
    # Every round's index tensors go to the device before any round runs: a copy from pageable host
    # memory waits for the stream, so copying per round would stall the GPU queue between rounds.
    layouts = [layout.to(dev) for layout in plan.rounds]
    for r, layout in enumerate(layouts):
        ids_r = flat_ids[layout.src][None]
        pos_r = fam.model_positions(flat_pos[:, layout.src][:, None])
        mask_r = round_mask(layout, rank_blocks if r == 0 else None)
        if blind is not None:
            mask_r = without_blind_pairs(mask_r, layout, *blind)
        slot_r, values = _slot_values(layout, ids_r, hiddens, feedback, detach_latents)
        if values is not None:
            latents_round_order.append(values)
        extra = {}
        if r == 0 and images_in:  # every image lies before its sample's first slot: round 0 takes them all
            extra = {**images_in, **{k: v[layout.src][None] for k, v in flat_tokens.items()}}
        hiddens.append(run_round(layout, mask_r, ids_r, pos_r, slot_r, values, extra)[0])

    # 3. Back to the batch's layout: (B, L, D) hidden states and the latents in slot order.
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


def _slot_values(layout, ids_r, hiddens, feedback, detach_latents):
    """(slot mask of the round, the vectors its latent slots take): each slot's sample's hidden state at the
    position before it, from the round that computed it, through the slot settings (`feedback`)."""
    if not len(layout.slot_local):
        return None, None
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
    return slot_r, values


class _CachedRounds:
    """Rounds through one grad-carrying cache that grows a round at a time (and, for linear-attention layers,
    per-sample states carried from round to round: `latent.recurrent_rounds`)."""

    def __init__(self, model, inner, batch_size: int):
        self.model, self.inner, self.batch_size = model, inner, batch_size
        self.cache = _round_cache(unwrap(model).config)
        self.states = RecurrentStates()

    def __call__(self, layout, mask_r, ids_r, pos_r, slot_r, values, extra):
        language_model = family(self.model).language_model(self.model)
        width = len(layout.q_index) // self.batch_size
        with (
            latent_inputs(self.model, slot_r, values),
            packed_round(language_model, layout, mask_r),
            recurrent_round(language_model, layout, width, self.batch_size, self.states),
        ):
            return _inner_forward(
                self.inner,
                input_ids=ids_r,
                position_ids=pos_r,
                use_cache=True,
                **cache_kwargs(self.inner, self.cache),
                **extra,
            )


class _CheckpointedRounds:
    """Rounds as checkpointed pure functions of (round inputs, past keys/values): each returns its hidden states
    and its new keys/values, kept here as one chunk per round and layer."""

    def __init__(self, model, inner, batch_size: int):
        self.model, self.inner, self.config = model, inner, unwrap(model).config
        self.batch_size = batch_size
        self.past_k: list[list[torch.Tensor]] = []  # per layer: chunks, one per round
        self.past_v: list[list[torch.Tensor]] = []
        # linear-attention layers: their indices, and the states the last round left (flat, as the round returns)
        self.recurrent = [i for i, _ in recurrent_layers(family(model).language_model(model))]
        self.states: list[torch.Tensor] = []

    def __call__(self, layout, mask_r, ids_r, pos_r, slot_r, values, extra):
        past_k, past_v = self.past_k, self.past_v
        # the keys so far (a linear-attention layer's chunks are empty: the longest layer counts)
        n_past = max(sum(c.shape[2] for c in layer) for layer in past_k) if past_k else 0
        flat_past = [c for layer in past_k for c in layer] + [c for layer in past_v for c in layer]
        n_chunks = len(past_k[0]) if past_k else 0
        recurrent = (
            self.recurrent,
            self.batch_size,
            len(layout.q_index) // self.batch_size,
            len(self.states),
        )
        owner = (self.model, self.inner, self.config, recurrent)
        round_inputs = (layout, mask_r, ids_r, pos_r, slot_r, values, extra)
        out = torch.utils.checkpoint.checkpoint(
            _checkpointed_round,
            owner,
            *round_inputs,
            n_past,
            n_chunks,
            *self.states,
            *flat_past,
            use_reentrant=False,
        )
        if self.recurrent:  # the new states come right after the hidden states
            n_states = 2 * len(self.recurrent)
            self.states = list(out[1 : 1 + n_states])
            out = (out[0], *out[1 + n_states :])
        n_layers = (len(out) - 1) // 2
        if not past_k:
            self.past_k = [[] for _ in range(n_layers)]
            self.past_v = [[] for _ in range(n_layers)]
        for i in range(n_layers):
            self.past_k[i].append(out[1 + i])
            self.past_v[i].append(out[1 + n_layers + i])
        return out[0]


def _round_cache(config, data=None):
    """The rounds' grad-carrying cache: every layer keeps every key (the packed indices address them all;
    a sliding-window layer's window is applied by the round's attention mask instead of by trimming)."""
    from transformers import DynamicCache

    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if any(t != "full_attention" for t in getattr(text, "layer_types", None) or ()):
        return DynamicCache(ddp_cache_data=data) if data else DynamicCache()
    return DynamicCache(ddp_cache_data=data, config=config) if data else DynamicCache(config=config)


def _checkpointed_round(owner, layout, mask_r, ids_r, pos_r, slot_r, values, extra, n_past, n_chunks, *flat):
    """One round as a pure function: the linear-attention layers' states and the past key/value chunks in,
    (hidden, new states..., new keys..., new values...) out. `owner`: (model, inner model, config, (the
    linear-attention layers' indices, batch size, round width, how many of `flat` are states))."""
    model, inner, config, (layers_r, batch_size, width, n_states) = owner
    states = RecurrentStates.from_flat(layers_r, flat[:n_states]) if n_states else RecurrentStates()
    flat_past = flat[n_states:]
    if n_chunks:
        n_layers = len(flat_past) // (2 * n_chunks)
        ks = [torch.cat(flat_past[i * n_chunks : (i + 1) * n_chunks], dim=2) for i in range(n_layers)]
        vbase = n_layers * n_chunks
        vs = [
            torch.cat(flat_past[vbase + i * n_chunks : vbase + (i + 1) * n_chunks], dim=2)
            for i in range(n_layers)
        ]
        cache = _round_cache(config, list(zip(ks, vs)))
    else:
        cache = _round_cache(config)
    # The model's own checkpointing would drop the cache; it is off here, also in the backward replay
    # (which also needs the packed-round attention switched on again).
    language_model = family(model).language_model(model)
    with (
        model_checkpointing_off(model),
        latent_inputs(model, slot_r, values),
        packed_round(language_model, layout, mask_r),
        recurrent_round(language_model, layout, width, batch_size, states),
    ):
        h = _inner_forward(
            inner, input_ids=ids_r, position_ids=pos_r, use_cache=True, **cache_kwargs(inner, cache), **extra
        )
    # a linear-attention layer leaves no keys: an empty chunk keeps every later layer at its own index
    empty = h.new_zeros(1, 1, 0, 1)
    kv = [
        (layer.keys, layer.values) if getattr(layer, "keys", None) is not None else (empty, empty)
        for layer in cache.layers
    ]
    if n_past:
        new_k = [k[:, :, n_past:].clone() if k.shape[2] else k for k, _ in kv]
        new_v = [v[:, :, n_past:].clone() if v.shape[2] else v for _, v in kv]
    else:
        new_k = [k for k, _ in kv]
        new_v = [v for _, v in kv]
    return (h, *states.flat(), *new_k, *new_v)


# --------------------------------------------------------------------------- recompute


def rounds_across_ranks(model, count: int, device) -> int:
    """The most passes any rank makes through the model for this step: `count` itself, except under ZeRO-3 with
    several processes, where every forward of a layer gathers its partitioned weights, a collective each rank
    must make as often as the others (one rank with fewer rounds would leave the rest waiting, or pair their
    gathers with the wrong layer's). One all-reduce of one number, only there."""
    if not is_partitioned(model) or not torch.distributed.is_initialized():
        return count
    if torch.distributed.get_world_size() < 2:
        return count
    most = torch.tensor([count], device=device)
    torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
    return int(most.item())


def _recompute(model, batch: _Batch, detach_latents: bool, feedback) -> SelfLatentOutput:
    input_ids, attention_mask, slot_mask, position_ids, vision, bottleneck = batch
    inner = multimodal_model(model)
    B, L = input_ids.shape
    counts = slot_mask.sum(1).cpu()  # one host sync per batch
    passes = rounds_across_ranks(model, int(counts.max()) + 1 if B else 1, input_ids.device)
    n = int(counts.sum())
    prev = torch.zeros_like(slot_mask)
    prev[:, :-1] = slot_mask[:, 1:]  # position t-1 of every slot t, same row-major order
    fam = family(model)
    extra = vision if any(k in fam.vision_keys for k in vision) else {}
    # from the config and the model's dtype: under ZeRO-3 the embedding's local tensor is empty, and a PEFT
    # trainable-token wrapper's `weight` merges rows (which fails on a partitioned tensor)
    net = unwrap(model)
    D = net.config.get_text_config().hidden_size
    values = torch.zeros(n, D, dtype=net.dtype, device=input_ids.device)
    hidden = None
    with visual_bottleneck(model, input_ids, slot_mask, bottleneck):  # one mask for every pass
        for i in range(passes):
            with latent_inputs(model, slot_mask, values):
                hidden = _inner_forward(
                    inner,
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    position_ids=fam.model_positions(position_ids),
                    **extra,
                )
            if i < passes - 1:
                values = feedback(hidden[prev])
                if detach_latents:
                    values = values.detach()
    hidden = hidden * attention_mask.to(hidden.dtype)[..., None]
    return SelfLatentOutput(hidden, values, "recompute", passes, B * L * passes, "full")
