"""The logic behind `recipes/grpo_<benchmark>.py`: stage 3 (GRPO with latent rollouts) from a stage-2 output."""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

GRPO_STAGE = 3


def run_grpo(script_args, training_args, model_args, benchmark: str | None = None):
    """Load the stage-2 model (full or LoRA adapter), train with GRPO, save like the SFT stages, push if asked.

    The accuracy reward grades each row with its own `benchmark` column (the loader sets it from `--benchmark`,
    or infers it for VSP).
    """
    from .scripts import train_and_save
    from .trainers.grpo import MirageGRPOTrainer

    # TRL keeps a frozen copy of a continued stage-2 adapter as the KL reference.
    return train_and_save(MirageGRPOTrainer, script_args, training_args, model_args, GRPO_STAGE, benchmark)
