"""A model made ready for Mirage: the latent size checked once against what the model carries and recorded in
its settings, the latent tokens added to the tokenizer and given rows in the model, the vision tower frozen."""

from __future__ import annotations

import logging

from .families import unwrap, vision_tower
from .settings import MirageSettings
from .tokens import LATENT_TOKEN_NAMES, LatentTokens, add_tokens, make_room, tokenizer_of

logger = logging.getLogger(__name__)


def add_latent_tokens(processing_class, model=None, latent_size: int = 4) -> LatentTokens:
    """Add the latent tokens to a tokenizer/processor (and make room for them in `model`).

    The embedding is resized only when it has no spare rows (Qwen checkpoints have some); rows of
    new tokens start from the mean of the existing rows, in the input embedding and in the LM head
    (so the model can learn to emit start/end). The latent size is recorded in the model's Mirage settings;
    a model that already carries another latent size is refused (`MirageSettings.adopt`).
    """
    MirageSettings(latent_size=latent_size)  # a latent size that is not an integer >= 1 is refused first
    if model is not None:
        MirageSettings.adopt(model, latent_size)
    new_ids = add_tokens(processing_class)
    if model is not None:
        make_room(model, tokenizer_of(processing_class), new_ids)
    return LatentTokens.from_tokenizer(processing_class, latent_size)


def prepare_model(model, processing_class, latent_size: int, stage: int | None = None) -> LatentTokens:
    """Add the latent tokens (checking the latent size against the checkpoint), freeze the vision tower."""
    vision = vision_tower(model)  # a clear error for a model without one
    had_tokens = all(t in tokenizer_of(processing_class).get_vocab() for t in LATENT_TOKEN_NAMES)
    tokens = add_latent_tokens(processing_class, unwrap(model), latent_size)
    if stage == 2 and not had_tokens:
        logger.warning(
            "stage 2 starts from a model without latent tokens: they are new and untrained "
            "(this is the paper's no-stage-1 ablation)"
        )
    vision.requires_grad_(False)
    return tokens
