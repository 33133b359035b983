"""Where the latent slots are: the one owner of the span layout.

Every `<output_image>` marker of the data becomes a span: `<|latent_start|>`, k x `<|latent_pad|>`
(the slots), `<|latent_end|>`. One rule says which positions of a token sequence are slots, for
every caller (the collator, GRPO's loss mask, the decoder, the text shown to users):

* a slot is a `<|latent_pad|>` among the k positions after a `<|latent_start|>`;
* the forced end is the `<|latent_end|>` k + 1 positions after it (the decoder writes it, nobody
  samples it, so GRPO does not train it);
* a `<|latent_pad|>` anywhere else is a text token the model chose (it is scored as text, as it
  was decoded), and a span cut by a length limit keeps its first slots.

`slot_masks` is the rule over whole sequences, `advance_spans` the same rule one decoding step at a
time (tests check that both give the same slots), `expand_markers` and `span_text` build spans,
`spans_to_markers` shows each span as the data's marker again.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..data.reference import OUTPUT_IMAGE_MARKER
from ..models.tokens import LATENT_END, LATENT_PAD, LATENT_START, LatentTokens


def span_ids(tokens: LatentTokens) -> list[int]:
    """The ids of one span: start, k pads, end."""
    return [tokens.start_id, *([tokens.pad_id] * tokens.latent_size), tokens.end_id]


def span_text(latent_size: int) -> str:
    """The text of one span (what replaces an `<output_image>` marker), for tokenizers and tests."""
    return LATENT_START + LATENT_PAD * latent_size + LATENT_END


def expand_markers(
    text: str, tokens: LatentTokens, encode: Callable[[str], list[int]]
) -> tuple[list[int], int]:
    """Token ids of `text` with each `<output_image>` marker replaced by a span, and the number of spans.

    The text between markers is encoded piece by piece (`encode`: text -> ids, no special tokens added),
    so a span's ids never depend on what the tokenizer would merge across it.
    """
    pieces = text.split(OUTPUT_IMAGE_MARKER)
    span = span_ids(tokens)
    ids: list[int] = []
    for i, piece in enumerate(pieces):
        if i:
            ids.extend(span)
        if piece:
            ids.extend(encode(piece))
    return ids, len(pieces) - 1


def slot_masks(ids: torch.Tensor, tokens: LatentTokens) -> tuple[torch.Tensor, torch.Tensor]:
    """(slots, forced_end) bool masks of a (B, L) batch of ids (see the module doc for the rule)."""
    k = tokens.latent_size
    is_start = ids == tokens.start_id
    slots = torch.zeros_like(is_start)
    forced = torch.zeros_like(is_start)
    length = ids.shape[-1]
    for j in range(1, min(k, length - 1) + 1):  # k shifted copies: no loop over the batch or the tokens
        slots[..., j:] |= is_start[..., :-j]
    if length > k + 1:
        forced[..., k + 1 :] = is_start[..., : length - k - 1]
    return slots & (ids == tokens.pad_id), forced & (ids == tokens.end_id)


def count_spans(ids: torch.Tensor, tokens: LatentTokens) -> torch.Tensor:
    """Spans opened per sequence of a (B, L) batch."""
    return (ids == tokens.start_id).sum(-1)


def advance_spans(
    token: torch.Tensor, text_step: torch.Tensor, remaining: torch.Tensor, start_id: int, latent_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One decoding step of the layout, for a batch: (started, force_end, remaining) after `token`.

    `remaining` counts the slots a sample still has to feed (> 0: the step just fed was a slot);
    `text_step` marks samples whose `token` was picked as text. A start picked as text opens k slots;
    the step after the last slot is the forced end.
    """
    in_latent = remaining > 0
    started = text_step & (token == start_id)
    force_end = in_latent & (remaining == 1)
    remaining = torch.where(started, latent_size, remaining - in_latent.long())
    return started, force_end, remaining


def spans_to_markers(tokenizer, ids: list[int], tokens: LatentTokens | None) -> str:
    """Decode ids with special tokens skipped, each span (start, its pads and end; also a cut or
    removed one) shown as one `<output_image>`, the marker of the training data."""
    if tokens is None:
        return tokenizer.decode(ids, skip_special_tokens=True)
    parts: list[str] = []
    segment: list[int] = []
    in_span = False
    for i in ids:
        if i == tokens.start_id:
            parts.append(tokenizer.decode(segment, skip_special_tokens=True))
            parts.append(OUTPUT_IMAGE_MARKER)
            segment = []
            in_span = True
        elif in_span and i in (tokens.pad_id, tokens.end_id):
            in_span = i != tokens.end_id
        else:
            in_span = False
            segment.append(i)
    parts.append(tokenizer.decode(segment, skip_special_tokens=True))
    return "".join(parts)
