"""Mirage stage 1 on SAT: joint text CE + cosine latent loss against pooled helper-image features.

Usage:
    # tiny offline model on CPU, on your own reference-format rows
    accelerate launch --cpu recipes/stage1_sat.py --config recipes/vsp/stage1_tiny.yaml \
        --dataset_name my_sat_train.jsonl
    # Qwen2.5-VL-7B-Instruct, LoRA, one or more GPUs with DeepSpeed ZeRO-2
    accelerate launch --config_file zero_configs/zero2.yaml recipes/stage1_sat.py \
        --config recipes/Qwen2.5-VL-7B-Instruct/stage1_sat_lora.yaml
Any YAML key can be overridden on the command line, e.g. `--per_device_train_batch_size 4`.
"""

from trl import ModelConfig

from mirage_trl.cli import run_recipe
from mirage_trl.configs import MirageScriptArguments, MirageSFTConfig
from mirage_trl.preflight import parse_recipe_args
from mirage_trl.scripts import run_sft


def main():
    # Parse the YAML and the flags; every bad setting is one line, found before any model loads.
    script_args, training_args, model_args = parse_recipe_args(
        (MirageScriptArguments, MirageSFTConfig, ModelConfig)
    )
    run_sft(script_args, training_args, model_args, stage=1, benchmark="sat")


if __name__ == "__main__":
    run_recipe(main)
