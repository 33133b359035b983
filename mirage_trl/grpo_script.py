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
    from peft import PeftModel
    from trl import get_peft_config

    from .models.training import load_for_training
    from .scripts import load_train_data, push_outputs, save_outputs
    from .trainers.grpo import MirageGRPOTrainer

    train, evals = load_train_data(script_args, benchmark)
    model, processor = load_for_training(model_args.model_name_or_path, training_args, model_args)
    # A stage-2 LoRA output is continued as the same adapter (TRL keeps a frozen copy as the KL reference).
    peft_config = None if isinstance(model, PeftModel) else get_peft_config(model_args)
    trainer = MirageGRPOTrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=evals,
        processing_class=processor,
        peft_config=peft_config,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    save_outputs(trainer, training_args.output_dir, stage=GRPO_STAGE, base_model=model_args.model_name_or_path)
    if training_args.push_to_hub:
        push_outputs(trainer, script_args.dataset_name)
    return trainer
