"""The span layout (`latent.layout`) against plain per-sequence walks written here."""

from __future__ import annotations

import random

import torch

from mirage_trl.latent.layout import (
    advance_spans,
    count_spans,
    expand_markers,
    slot_masks,
    span_ids,
    span_text,
    spans_to_markers,
)
from mirage_trl.models.tokens import LatentTokens

K = 3
TOKENS = LatentTokens(start_id=90, pad_id=91, end_id=92, latent_size=K)


def walk(ids: list[int]) -> tuple[set[int], set[int]]:
    """Slots and forced ends of one sequence, read left to right as a decoder would."""
    slots, forced, i = set(), set(), 0
    while i < len(ids):
        if ids[i] == TOKENS.start_id:
            for j in range(i + 1, min(i + 1 + K, len(ids))):
                if ids[j] == TOKENS.pad_id:
                    slots.add(j)
            if i + 1 + K < len(ids) and ids[i + 1 + K] == TOKENS.end_id:
                forced.add(i + 1 + K)
            i += K + 2
        else:
            i += 1
    return slots, forced


def random_sequences(n: int, length: int, seed: int = 0) -> list[list[int]]:
    """Text tokens with whole spans, cut spans and stray pads/ends written as text."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ids: list[int] = []
        while len(ids) < length:
            r = rng.random()
            if r < 0.2:
                ids.extend(span_ids(TOKENS))
            elif r < 0.25:
                ids.append(rng.choice([TOKENS.pad_id, TOKENS.end_id]))
            else:
                ids.append(rng.randrange(10, 80))
        out.append(ids[:length])  # the last span may be cut
    return out


def test_slot_masks_match_a_walk_over_each_sequence():
    seqs = random_sequences(16, 40)
    slots, forced = slot_masks(torch.tensor(seqs), TOKENS)
    for i, ids in enumerate(seqs):
        exp_slots, exp_forced = walk(ids)
        assert set(slots[i].nonzero().flatten().tolist()) == exp_slots
        assert set(forced[i].nonzero().flatten().tolist()) == exp_forced
    assert count_spans(torch.tensor(seqs), TOKENS).tolist() == [s.count(TOKENS.start_id) for s in seqs]


def test_stray_pad_is_text_and_short_rows_work():
    ids = torch.tensor([[TOKENS.pad_id, 5, TOKENS.end_id, TOKENS.start_id]])
    slots, forced = slot_masks(ids, TOKENS)
    assert not slots.any() and not forced.any()
    one = torch.tensor([[TOKENS.pad_id]])
    assert slot_masks(one, TOKENS)[0].tolist() == [[False]]


def test_advance_spans_step_by_step_gives_the_same_slots():
    """Decode with the streaming rule (random text picks) and compare the slots with `slot_masks`."""
    gen = torch.Generator().manual_seed(0)
    batch, steps = 6, 30
    remaining = torch.zeros(batch, dtype=torch.long)
    force_end = torch.zeros(batch, dtype=torch.bool)
    seq = torch.zeros(batch, steps, dtype=torch.long)
    fed_slot = torch.zeros(batch, steps, dtype=torch.bool)
    for t in range(steps):
        in_latent = remaining > 0
        text_step = ~(in_latent | force_end)
        picked = torch.where(torch.rand(batch, generator=gen) < 0.25, TOKENS.start_id, 20)
        token = torch.where(text_step, picked, TOKENS.pad_id)
        token = torch.where(force_end, TOKENS.end_id, token)
        seq[:, t], fed_slot[:, t] = token, in_latent
        _, force_end, remaining = advance_spans(token, text_step, remaining, TOKENS.start_id, K)
    slots, forced = slot_masks(seq, TOKENS)
    assert torch.equal(slots, fed_slot)
    assert torch.equal(forced, seq == TOKENS.end_id)


class _Tok:
    """Ids 10.. are letters a.., the latent ids decode to nothing (special tokens skipped)."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + i - 10) for i in ids if 10 <= i < 36)

    def encode(self, text):
        return [ord(c) - ord("a") + 10 for c in text]


def test_expand_markers_and_markers_back():
    tok = _Tok()
    ids, n = expand_markers("ab<output_image>c<output_image>", TOKENS, tok.encode)
    assert n == 2
    assert ids == [10, 11, *span_ids(TOKENS), 12, *span_ids(TOKENS)]
    assert spans_to_markers(tok, ids, TOKENS) == "ab<output_image>c<output_image>"
    # a cut span and a removed one are still one marker each; stray pads outside a span are skipped text
    assert spans_to_markers(tok, [10, TOKENS.start_id, TOKENS.pad_id, 11], TOKENS) == "a<output_image>b"
    assert spans_to_markers(tok, [10, TOKENS.start_id, TOKENS.end_id, 11], TOKENS) == "a<output_image>b"
    assert spans_to_markers(tok, ids, None) == "abc"
    assert span_text(2) == "<|latent_start|><|latent_pad|><|latent_pad|><|latent_end|>"
