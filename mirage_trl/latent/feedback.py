"""What a latent slot receives after stage 1: the model's own hidden state, rescaled, or nothing.

Stage 1 puts pooled helper-image features at the slots; stage 2, decoding and GRPO put the
model's final-norm hidden state from the position before each slot there instead. Two Mirage
settings (`latent.settings`, saved with the model, so every later stage, export and evaluation uses
the same) change that vector, in this one place:

* ``latent_feedback_norm`` (float or None): rescale every fed-back hidden state to this norm. The
  stage-1 trainer measures the mean norm of the targets (``latent_target_norm``); with
  ``--latent_feedback_norm target`` that value is used, so stage 2 and inference feed vectors of
  the scale the model saw at its slots in stage 1 (a final-norm hidden state of a small model has
  norm ~ sqrt(hidden size), pooled vision features often far less).
* ``latent_slot_input`` = "zeros": the markers-only control. Spans, markers and slots stay, but
  every stage and every decoding step feeds zeros at the slots (and stage 1 has no latent loss),
  so whatever such a model gains comes from the span format, not from latent content.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.settings import SLOT_INPUTS, MirageSettings


@dataclass(frozen=True)
class LatentFeedback:
    """Maps hidden states (n, D) to what the slots receive."""

    slot_input: str = "latent"
    norm: float | None = None

    def __post_init__(self):
        if self.slot_input not in SLOT_INPUTS:
            raise ValueError(f"latent slot input {self.slot_input!r}: choose one of {', '.join(SLOT_INPUTS)}")

    @property
    def is_identity(self) -> bool:
        return self.slot_input == "latent" and self.norm is None

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.slot_input == "zeros":
            return torch.zeros_like(hidden)
        if self.norm is None:
            return hidden
        scale = self.norm / hidden.float().norm(dim=-1, keepdim=True).clamp(min=1e-6)
        return hidden * scale.to(hidden.dtype)

    @classmethod
    def from_settings(cls, settings: MirageSettings | None) -> LatentFeedback:
        if settings is None:
            return cls()
        return cls(slot_input=settings.latent_slot_input, norm=settings.latent_feedback_norm)

    @classmethod
    def from_model(cls, model) -> LatentFeedback:
        return cls.from_settings(MirageSettings.of_model(model))
