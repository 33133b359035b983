"""The text-only SFT baseline (and the helper-as-input upper bound), step by step: what every
`recipes/text_text_sft_<benchmark>.py` runs, with TRL's `SFTTrainer`.
"""

from trl import ModelConfig

from mirage_trl.configs import BaselineScriptArguments, BaselineSFTConfig
from mirage_trl.models.families import vision_tower
from mirage_trl.models.load import load_for_training
from mirage_trl.preflight import preflight
from mirage_trl.run import launch, load_train_data, push_outputs, save_outputs, train
from mirage_trl.trainers.text_sft import (
    TextSFTTrainer,
    baseline_peft_config,
    build_sft_dataset,
    write_baseline_config,
)

ARGS = (BaselineScriptArguments, BaselineSFTConfig, ModelConfig)


def main(script_args, training_args, model_args, *, benchmark: str | None):
    # 1. Check every setting, path and logging backend before anything heavy.
    preflight(script_args, training_args, model_args)

    # 2. Data: the same rows as Mirage, markers and helper images removed (or helpers as input images).
    train_dataset, eval_dataset = load_train_data(script_args, benchmark)
    train_dataset = build_sft_dataset(train_dataset, script_args.helper_as_input)
    if eval_dataset is not None:
        eval_dataset = build_sft_dataset(eval_dataset, script_args.helper_as_input)

    # 3. Model and processor; the vision tower stays frozen, as for Mirage, unless --train_vision_tower.
    model, processor = load_for_training(model_args.model_name_or_path, training_args, model_args)
    vision_tower(model).requires_grad_(script_args.train_vision_tower)

    # 4. Trainer: TRL's SFTTrainer (LoRA "all-linear" means the language model's linear layers).
    trainer = TextSFTTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processor,
        peft_config=baseline_peft_config(model_args),
    )

    # 5. Train, resuming from the newest complete checkpoint in output_dir if there is one; save metrics and state.
    train(trainer, training_args)

    # 6. Save the model or adapter, the processor, what baseline this is and the model card.
    save_outputs(
        trainer, training_args.output_dir, None, model_args.model_name_or_path, [script_args.dataset_name]
    )
    if trainer.accelerator.is_main_process:
        write_baseline_config(
            training_args.output_dir,
            script_args.helper_as_input,
            script_args.dataset_name,
            model_args.model_name_or_path,
        )

    # 7. Push to the Hub when asked.
    if training_args.push_to_hub:
        push_outputs(trainer, script_args.dataset_name)
    return trainer


if __name__ == "__main__":
    launch(main, ARGS, benchmark=None)
