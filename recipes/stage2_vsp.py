"""Mirage stage 2 on VSP spatial planning / reasoning (benchmark inferred from the rows): text loss with gradients through self-generated latents (start from a stage-1 output).

Usage:
    # tiny offline model on CPU (see `make demo`)
    accelerate launch --cpu recipes/stage2_vsp.py --config recipes/tiny/stage2/config_vsp_smoke.yaml
    # Qwen2.5-VL-7B-Instruct, LoRA, one or more GPUs with DeepSpeed ZeRO-2
    accelerate launch --config_file zero_configs/zero2.yaml recipes/stage2_vsp.py \
        --config recipes/Qwen2.5-VL-7B-Instruct/stage2/config_vsp_lora.yaml
Any YAML key can be overridden on the command line, e.g. `--per_device_train_batch_size 4`.
"""

from trl import ModelConfig

from mirage_trl.configs import MirageScriptArguments, MirageSFTConfig
from mirage_trl.models.load import load_for_training
from mirage_trl.preflight import parse_recipe_args, preflight
from mirage_trl.run import (
    check_stage,
    load_train_data,
    peft_config_for,
    push_outputs,
    run_recipe,
    save_outputs,
    train,
)
from mirage_trl.trainers.sft import MirageSFTTrainer

STAGE = 2
BENCHMARK = None  # inferred from the rows: vsp_planning, vsp_reasoning or vsp_grounding (--benchmark wins)


def main(script_args, training_args, model_args):
    # 1. Check every setting, path and logging backend before anything heavy; the stage is this recipe's.
    check_stage(training_args, STAGE, "recipes/stage2_vsp.py")
    preflight(script_args, training_args, model_args)

    # 2. Data: reference-format rows; images stay on disk until a batch needs them.
    train_dataset, eval_dataset = load_train_data(script_args, BENCHMARK)

    # 3. Model and processor: the stage-1 output (its LoRA adapter continues, still trainable).
    model, processor = load_for_training(model_args.model_name_or_path, training_args, model_args)

    # 4. Trainer: TRL's SFTTrainer with the stage-2 loss (text CE through self-generated latents).
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
        trainer, training_args.output_dir, STAGE, model_args.model_name_or_path, [script_args.dataset_name]
    )

    # 7. Push to the Hub when asked.
    if training_args.push_to_hub:
        push_outputs(trainer, script_args.dataset_name)
    return trainer


if __name__ == "__main__":
    run_recipe(lambda: main(*parse_recipe_args((MirageScriptArguments, MirageSFTConfig, ModelConfig))))
