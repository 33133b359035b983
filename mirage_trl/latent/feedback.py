"""What a latent slot receives after stage 1: the model's own hidden state, rescaled, or nothing.

Stage 1 puts pooled helper-image features at the slots; stage 2, decoding and GRPO put the
model's final-norm hidden state from the position before each slot there instead. Two Mirage
settings (saved with the model, so every later stage, export and evaluation uses the same) change
that vector, in this one place:

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

SLOT_INPUTS = ("latent", "zeros")
FEEDBACK_NORM_CHOICES = ("none", "target")
# keys of the Mirage settings (config.json "mirage" / mirage_config.json)
SLOT_INPUT_KEY = "latent_slot_input"
FEEDBACK_NORM_KEY = "latent_feedback_norm"
TARGET_NORM_KEY = "latent_target_norm"
SETTINGS_KEYS = (SLOT_INPUT_KEY, FEEDBACK_NORM_KEY, TARGET_NORM_KEY)


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
    def from_settings(cls, settings: dict | None) -> LatentFeedback:
        settings = settings or {}
        norm = settings.get(FEEDBACK_NORM_KEY)
        return cls(
            slot_input=settings.get(SLOT_INPUT_KEY) or "latent",
            norm=float(norm) if norm is not None else None,
        )

    @classmethod
    def from_model(cls, model) -> LatentFeedback:
        from .model_utils import unwrap
        from .tokens import get_mirage_config

        return cls.from_settings(get_mirage_config(unwrap(model)))


def slot_settings(settings: dict | None) -> dict:
    """The slot-input keys of a settings dict (what loaders carry over to the loaded model)."""
    return {k: v for k, v in (settings or {}).items() if k in SETTINGS_KEYS}


def resolve_slot_settings(
    saved: dict | None, markers_only: bool, feedback_norm: str | None, stage: int | None
):
    """The slot settings a trainer runs with: the model's saved ones, changed by the run's flags.

    `markers_only` stays on once a model was trained that way (a stage-2 run of a markers-only stage 1
    is markers-only too); `feedback_norm` None keeps what the model has, "none" turns it off, "target"
    uses the stage-1 target norm (measured by this run when it is stage 1). Returns (settings, error)."""
    saved = slot_settings(saved)
    out = dict(saved)
    if markers_only or saved.get(SLOT_INPUT_KEY) == "zeros":
        out[SLOT_INPUT_KEY] = "zeros"
    else:
        out[SLOT_INPUT_KEY] = "latent"
    if feedback_norm == "none":
        out[FEEDBACK_NORM_KEY] = None
    elif feedback_norm == "target":
        target = saved.get(TARGET_NORM_KEY)
        if target is None and stage != 1:
            return out, (
                "--latent_feedback_norm target: the model has no measured stage-1 target norm "
                f"({TARGET_NORM_KEY} in its Mirage settings); train stage 1 with mirage-trl first"
            )
        out[FEEDBACK_NORM_KEY] = target  # stage 1: set when measured
    return out, None
