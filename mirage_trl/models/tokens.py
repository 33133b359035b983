"""The three latent tokens, added to a tokenizer/processor and given rows in a model by name; ids are always
looked up. `models.prepare.add_latent_tokens` does both and records the latent size."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import MirageError
from .families.parts import full_shape, gathered

LATENT_START = "<|latent_start|>"
LATENT_PAD = "<|latent_pad|>"
LATENT_END = "<|latent_end|>"
LATENT_TOKEN_NAMES = (LATENT_START, LATENT_PAD, LATENT_END)


def tokenizer_of(processing_class):
    """The tokenizer of a processor (or the tokenizer itself)."""
    return getattr(processing_class, "tokenizer", processing_class)


@dataclass(frozen=True)
class LatentTokens:
    """Ids of the latent tokens in one tokenizer, and the latent size k."""

    start_id: int
    pad_id: int
    end_id: int
    latent_size: int

    @classmethod
    def from_tokenizer(cls, processing_class, latent_size: int) -> LatentTokens:
        tok = tokenizer_of(processing_class)
        vocab = tok.get_vocab()
        missing = [t for t in LATENT_TOKEN_NAMES if t not in vocab]
        if missing:
            raise MirageError(
                f"tokenizer has no latent tokens {missing}; call mirage_trl.add_latent_tokens(processor, model) first"
            )
        return cls(vocab[LATENT_START], vocab[LATENT_PAD], vocab[LATENT_END], int(latent_size))


def add_tokens(processing_class) -> list[int]:
    """Add the latent tokens to a tokenizer/processor's tokenizer; returns the ids that are new to it."""
    tok = tokenizer_of(processing_class)
    before = len(tok)
    tok.add_special_tokens(
        {"additional_special_tokens": list(LATENT_TOKEN_NAMES)}, replace_extra_special_tokens=False
    )
    vocab = tok.get_vocab()
    return sorted(vocab[t] for t in LATENT_TOKEN_NAMES if vocab[t] >= before)


def make_room(model, tok, new_ids: list[int]) -> None:
    """Give the new tokens rows in `model`: the embedding is resized only when it has no spare rows (Qwen
    checkpoints have some); rows of new tokens start from the mean of the rows below them, in the input
    embedding and in the LM head (so the model can learn to emit start/end)."""
    emb = model.get_input_embeddings()
    rows = full_shape(emb.weight)[0]  # under ZeRO-3 the local tensor is empty: its shape would say 0 rows
    if len(tok) > rows:
        # Mean init of the new rows is ours below; skip transformers' own (it samples a Gaussian).
        model.resize_token_embeddings(len(tok), mean_resizing=False)
        emb = model.get_input_embeddings()
    if not new_ids:
        return
    known = min(new_ids)  # rows below the first new token are the trained vocabulary
    layers = [layer for layer in (emb, model.get_output_embeddings()) if layer is not None]
    with torch.no_grad(), gathered(*(layer.weight for layer in layers)):
        for layer in layers:
            w = layer.weight
            w[new_ids] = w[:known].mean(dim=0, keepdim=True).to(w.dtype)
