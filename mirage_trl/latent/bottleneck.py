"""The visual bottleneck (`latent_bottleneck`): text that comes after a latent span's start cannot see the image.

Why: with the image in plain view, the answer tokens read it directly and the latents need carry nothing
(zeroing or shuffling them changes no answer). Under the bottleneck, the tokens that come after a row's
first `<|latent_start|>` and are neither a span's start nor one of its slots cannot attend to the input
image's tokens; the starts and the slots still can. Whatever the answer learns about the image must then
pass through the latents (or through the prompt's text, which read the image before the span). It is
LIVR's mask (arXiv 2512.21218); decoded with the mask on, it is also a probe: accuracy above what the best
fixed answer gets means the latents carry the image.

Two modes. "image", the rule above, leaves one way around the latents: the prompt's text after the image
read it, and the answer may read that text. "strict" closes it: every token after the sample's first image
token that is neither an image token, a span's start nor a slot is blind (the rest of the prompt included),
so the latents are the only way from the image to the answer.

One rule, three places that apply it:

* a full forward (stage 1, `visual_bottleneck`): the language model's attention is wrapped for the
  duration, the model's own mask (causal, padding, sliding windows, Gemma 3's two-way image blocks) is
  kept and the blind pairs are removed from it. The wrapped attention runs SDPA whatever the model's own
  implementation (flash-attention takes no arbitrary mask), with a (B, 1, L, L) boolean mask: L^2 bytes
  a row;
* stage 2's packed rounds (`latent.rounds.without_blind_pairs`, given `blind_queries` and the image tokens
  by rank);
* cached decoding (`generation`): a blind step's key mask hides the prompt's image columns.

Models whose language model has recurrent layers (Qwen3.5's linear attention) are refused: their
state reads the image whatever the attention mask says.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch

from ..errors import MirageError
from ..models.families import family, unwrap
from ..models.settings import MirageSettings

BOTTLENECK_ATTENTION = "mirage_bottleneck"
_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("mirage_bottleneck")


def span_starts(slot_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: each span's `<|latent_start|>`, the position just before its first slot."""
    starts = torch.zeros_like(slot_mask)
    starts[:, :-1] = slot_mask[:, 1:] & ~slot_mask[:, :-1]
    return starts


def blind_queries(
    slot_mask: torch.Tensor, images: torch.Tensor | None = None, mode: str = "image"
) -> torch.Tensor:
    """(B, L) bool: the positions that may not attend to the image. "image": after the row's first span start,
    neither a start nor a slot (the end marker, the text between spans, the answer); "strict": after the row's
    first image token (`images`, (B, L) bool), neither an image token, a start nor a slot."""
    slot_mask = slot_mask.bool()
    starts = span_starts(slot_mask)
    if mode == "strict":
        opened = (images.long().cumsum(1) > 0) & ~images.bool()
    else:
        opened = starts.long().cumsum(1) > 0
    return opened & ~starts & ~slot_mask


def trained_bottleneck(model) -> str:
    """The bottleneck the model was last trained under (its Mirage settings; "none" without settings): what its
    decoding applies unless told otherwise."""
    settings = MirageSettings.of_model(model)
    return settings.latent_bottleneck if settings is not None else "none"


def check_bottleneck_support(model) -> None:
    """One line for a model the mask cannot bottleneck (recurrent layers read every earlier token)."""
    fam = family(model)
    if fam.recurrent_layers(model):
        raise MirageError(
            f"--latent_bottleneck: {fam.name}'s recurrent (linear-attention) layers carry the image past "
            "any attention mask, so the bottleneck cannot hold; use --latent_bottleneck none"
        )


# --------------------------------------------------------------------------- full forwards


def bottleneck_attention(module, query, key, value, attention_mask, **kwargs):
    """The language model's attention with the blind (query, image key) pairs removed: the mask the model
    built for SDPA (None: plain causal) and the bottleneck's, run through SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    keep = _ACTIVE.get()  # (B, 1, L, L) bool
    q_len, k_len = query.shape[2], key.shape[2]
    keep = keep[..., k_len - q_len : k_len, :k_len]
    if attention_mask is None:
        rows = torch.arange(q_len, device=query.device)[:, None] + (k_len - q_len)
        attention_mask = torch.arange(k_len, device=query.device)[None, :] <= rows
    elif attention_mask.dtype != torch.bool:  # an additive mask: 0 where attended
        attention_mask = attention_mask == 0
    kwargs.pop("is_causal", None)
    return sdpa_attention_forward(module, query, key, value, attention_mask & keep, is_causal=False, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(BOTTLENECK_ATTENTION, bottleneck_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(
        BOTTLENECK_ATTENTION, sdpa_mask
    )  # the model's own mask, SDPA's form


def keep_mask(slot_mask: torch.Tensor, images: torch.Tensor, mode: str = "image") -> torch.Tensor:
    """(B, 1, L, L) bool, False where a blind query meets an image key."""
    blind = blind_queries(slot_mask, images, mode)
    return ~(blind[:, None, :, None] & images.bool()[:, None, None, :])


@contextlib.contextmanager
def visual_bottleneck(model, input_ids: torch.Tensor, slot_mask: torch.Tensor, mode: str = "image"):
    """While active, full forwards of `model` over this batch (B, L) run under the bottleneck `mode` ("none":
    as they are): the language model's attention implementation is swapped for `bottleneck_attention` (the
    vision tower keeps its own)."""
    if mode == "none":
        yield
        return
    check_bottleneck_support(model)
    fam = family(model)
    _register()
    config = fam.language_model(unwrap(model)).config
    before = config._attn_implementation_internal
    config._attn_implementation_internal = BOTTLENECK_ATTENTION
    token = _ACTIVE.set(keep_mask(slot_mask, fam.image_mask(model, input_ids), mode))
    try:
        yield
    finally:
        _ACTIVE.reset(token)
        config._attn_implementation_internal = before
