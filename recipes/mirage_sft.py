"""Mirage stages 1 and 2 (`MirageSFTTrainer`), step by step: what every `recipes/stage{1,2}_<benchmark>.py` runs.

Stage 1: joint text CE + cosine latent loss against pooled helper-image features; stage 2: text loss with
gradients through self-generated latents, from a stage-1 output. Run a benchmark's recipe
(`accelerate launch recipes/stage1_vsp.py --config ...`), or this file with `--stage` and `--benchmark`.
"""

from pathlib import Path

from trl import ModelConfig

from mirage_trl.configs import MirageScriptArguments, MirageSFTConfig
from mirage_trl.models.load import load_for_training
from mirage_trl.preflight import preflight
from mirage_trl.run import (
    check_stage,
    launch,
    load_train_data,
    peft_config_for,
    push_outputs,
    save_outputs,
    train,
)
from mirage_trl.trainers.sft import MirageSFTTrainer

ARGS = (MirageScriptArguments, MirageSFTConfig, ModelConfig)


def main(script_args, training_args, model_args, *, stage: int, benchmark: str | None, recipe: str):
    # 1. Check every setting, path and logging backend before anything heavy; the stage is the recipe's.
    stage = stage if stage is not None else (training_args.stage or 1)
    check_stage(training_args, stage, f"recipes/{Path(recipe).name}")
    preflight(script_args, training_args, model_args)

    # 2. Data: reference-format rows; images stay on disk until a batch needs them.
    train_dataset, eval_dataset = load_train_data(script_args, benchmark)

    # 3. Model and processor: a base model by name or path, or the stage-1 output (its LoRA adapter continues,
    #    still trainable).
    model, processor = load_for_training(model_args.model_name_or_path, training_args, model_args)

    # 4. Trainer: TRL's SFTTrainer with the Mirage loss of the stage (1: text CE x gamma + cosine to the pooled
    #    helper-image features; 2: text CE through self-generated latents).
    trainer = MirageSFTTrainer(
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
        trainer, training_args.output_dir, stage, model_args.model_name_or_path, [script_args.dataset_name]
    )

    # 7. Push to the Hub when asked.
    if training_args.push_to_hub:
        push_outputs(trainer, script_args.dataset_name)
    return trainer


if (
    __name__ == "__main__"
):  # direct use: the stage is --stage (default 1), the benchmark --benchmark or inferred
    launch(main, ARGS, stage=None, benchmark=None, recipe=__file__)
