"""Mirage GRPO (`MirageGRPOTrainer`, stage 3), step by step: what every `recipes/grpo_<benchmark>.py` runs.

GRPO with latent rollouts from a stage-2 output; reward 0.9 x accuracy + 0.1 x format by default.
"""

from trl import ModelConfig

from mirage_trl.configs import MirageGRPOConfig, MirageScriptArguments
from mirage_trl.models.load import load_for_training
from mirage_trl.preflight import preflight
from mirage_trl.run import launch, load_train_data, peft_config_for, push_outputs, save_outputs, train
from mirage_trl.stages import GRPO_STAGE
from mirage_trl.trainers.grpo import MirageGRPOTrainer

ARGS = (MirageScriptArguments, MirageGRPOConfig, ModelConfig)


def main(script_args, training_args, model_args, *, benchmark: str | None):
    # 1. Check every setting, path and logging backend before anything heavy.
    preflight(script_args, training_args, model_args)

    # 2. Data: the accuracy reward grades each row by its own `benchmark` column.
    train_dataset, eval_dataset = load_train_data(script_args, benchmark)

    # 3. Model and processor: the stage-2 output (a LoRA adapter stays trainable; TRL keeps a frozen copy as
    #    the KL reference).
    model, processor = load_for_training(model_args.model_name_or_path, training_args, model_args)

    # 4. Trainer: TRL's GRPOTrainer with latent rollouts; rewards from --reward_names / --reward_weights.
    trainer = MirageGRPOTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processor,
        peft_config=peft_config_for(model, model_args),
    )

    # 5. Train, resuming from the newest complete checkpoint in output_dir if there is one; save metrics and state.
    train(trainer, training_args)

    # 6. Save the model or adapter, the processor, the Mirage settings and the model card.
    save_outputs(
        trainer,
        training_args.output_dir,
        GRPO_STAGE,
        model_args.model_name_or_path,
        [script_args.dataset_name],
    )

    # 7. Push to the Hub when asked.
    if training_args.push_to_hub:
        push_outputs(trainer, script_args.dataset_name)
    return trainer


if __name__ == "__main__":
    launch(main, ARGS, benchmark=None)
