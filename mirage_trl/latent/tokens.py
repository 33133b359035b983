"""The three latent tokens, added to a tokenizer/processor and a model by name; ids are always looked up."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import MirageError

LATENT_START = "<|latent_start|>"
LATENT_PAD = "<|latent_pad|>"
LATENT_END = "<|latent_end|>"
LATENT_TOKEN_NAMES = (LATENT_START, LATENT_PAD, LATENT_END)
OUTPUT_IMAGE_MARKER = "<output_image>"
# Where the Mirage settings travel with a saved model (config.json).
CONFIG_KEY = "mirage"


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

    def span_text(self) -> str:
        """The text that replaces one `<output_image>` marker: start + k pads + end."""
        return LATENT_START + LATENT_PAD * self.latent_size + LATENT_END


def add_latent_tokens(processing_class, model=None, latent_size: int = 4) -> LatentTokens:
    """Add the latent tokens to a tokenizer/processor (and make room for them in `model`).

    The embedding is resized only when it has no spare rows (Qwen checkpoints have some); rows of
    new tokens start from the mean of the existing rows, in the input embedding and in the LM head
    (so the model can learn to emit start/end). The latent size is recorded in `model.config`.
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
        check_latent_size(model, latent_size)
        new_ids = [i for i in (tokens.start_id, tokens.pad_id, tokens.end_id) if i >= before]
        _make_room(model, tok, new_ids)
        set_mirage_config(model, latent_size)
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


def get_mirage_config(model) -> dict | None:
    config = getattr(model, "config", model)
    value = getattr(config, CONFIG_KEY, None)
    return dict(value) if isinstance(value, dict) else None


def set_mirage_config(model, latent_size: int, **settings) -> None:
    """Write the Mirage settings into the model config, keeping the other keys it already has
    (the slot settings of `latent.feedback` travel with the model through every stage)."""
    config = getattr(model, "config", model)
    merged = get_mirage_config(model) or {}
    merged.update(settings, latent_size=int(latent_size), latent_tokens=list(LATENT_TOKEN_NAMES))
    setattr(config, CONFIG_KEY, merged)


def check_latent_size(model, latent_size: int) -> None:
    """A model trained with latent size k must be used with k: anything else is a clear error."""
    saved = get_mirage_config(model)
    if saved is not None and int(saved.get("latent_size", latent_size)) != int(latent_size):
        name = getattr(getattr(model, "config", None), "_name_or_path", "") or "the model"
        raise MirageError(
            f"latent_size={latent_size} disagrees with {name}, which was trained with "
            f"latent_size={saved['latent_size']} (config.json '{CONFIG_KEY}'); use the same latent size"
        )


def check_checkpoint_latent_size(checkpoint_dir, latent_size: int) -> None:
    """Resuming from a `checkpoint-N` trained with another latent size is refused (one line, both values).

    Reads the checkpoint's `mirage_config.json`; a checkpoint without one (older runs) is not checked.
    """
    import json
    from pathlib import Path

    path = Path(checkpoint_dir) / "mirage_config.json"
    if not path.is_file():
        return
    try:
        saved = json.loads(path.read_text(encoding="utf-8")).get("latent_size")
    except (OSError, ValueError, AttributeError):
        raise MirageError(f"{path}: cannot read it as a JSON object") from None
    if saved is not None and int(saved) != int(latent_size):
        raise MirageError(
            f"--latent_size {latent_size} disagrees with {path} (latent_size={saved}); "
            f"resume with --latent_size {saved}, or start a new run"
        )
