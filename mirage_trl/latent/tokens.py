"""The three latent tokens, added to a tokenizer/processor and a model by name; ids are always looked up."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import MirageError

LATENT_START = "<|latent_start|>"
LATENT_PAD = "<|latent_pad|>"
LATENT_END = "<|latent_end|>"
LATENT_TOKEN_NAMES = (LATENT_START, LATENT_PAD, LATENT_END)
OUTPUT_IMAGE_MARKER = "<output_image>"  # where the data puts a helper image; the collator makes it a span


def _tokenizer(processing_class):
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
        tok = _tokenizer(processing_class)
        vocab = tok.get_vocab()
        missing = [t for t in LATENT_TOKEN_NAMES if t not in vocab]
        if missing:
            raise MirageError(
                f"tokenizer has no latent tokens {missing}; call mirage_trl.add_latent_tokens(processor, model) first"
            )
        return cls(vocab[LATENT_START], vocab[LATENT_PAD], vocab[LATENT_END], int(latent_size))


def add_latent_tokens(processing_class, model=None, latent_size: int = 4) -> LatentTokens:
    """Add the latent tokens to a tokenizer/processor (and make room for them in `model`).

    The embedding is resized only when it has no spare rows (Qwen checkpoints have some); rows of
    new tokens start from the mean of the existing rows, in the input embedding and in the LM head
    (so the model can learn to emit start/end). The latent size is recorded in the model's Mirage settings.
    A model that already carries another latent size is refused.
    """
    if latent_size < 1:
        raise MirageError(f"latent_size must be >= 1, got {latent_size}")
    tok = _tokenizer(processing_class)
    before = len(tok)
    tok.add_special_tokens(
        {"additional_special_tokens": list(LATENT_TOKEN_NAMES)}, replace_extra_special_tokens=False
    )
    tokens = LatentTokens.from_tokenizer(tok, latent_size)
    if model is not None:
        from .settings import MirageSettings, check_model_latent_size

        check_model_latent_size(model, latent_size)
        new_ids = [i for i in (tokens.start_id, tokens.pad_id, tokens.end_id) if i >= before]
        _make_room(model, tok, new_ids)
        MirageSettings.update(model, latent_size)
    return tokens


def _make_room(model, tok, new_ids: list[int]) -> None:
    import torch

    emb = model.get_input_embeddings()
    rows = emb.weight.shape[0]
    if len(tok) > rows:
        # Mean init of the new rows is ours below; skip transformers' own (it samples a Gaussian).
        model.resize_token_embeddings(len(tok), mean_resizing=False)
        emb = model.get_input_embeddings()
    if not new_ids:
        return
    known = min(new_ids)  # rows below the first new token are the trained vocabulary
    with torch.no_grad():
        for layer in (emb, model.get_output_embeddings()):
            if layer is None:
                continue
            w = layer.weight
            w[new_ids] = w[:known].mean(dim=0, keepdim=True).to(w.dtype)
