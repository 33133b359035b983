"""Mirage stage 3 on Jigsaw (BLINK): GRPO with latent rollouts from a stage-2 output; reward 0.9 x accuracy + 0.1 x format.

Usage:
    # tiny offline model on CPU (after `make demo` has made outputs/demo/stage2)
    accelerate launch --cpu recipes/grpo_jigsaw.py --config recipes/vsp/grpo_tiny.yaml --dataset_name <your jigsaw JSONL>
    # Qwen2.5-VL-7B-Instruct, LoRA, one or more GPUs with DeepSpeed ZeRO-2
    accelerate launch --config_file zero_configs/zero2.yaml recipes/grpo_jigsaw.py \
        --config recipes/Qwen2.5-VL-7B-Instruct/grpo_jigsaw_lora.yaml
Any YAML key can be overridden on the command line, e.g. `--num_generations 8`.
"""

from trl import ModelConfig

from mirage_trl.cli import run_recipe
from mirage_trl.configs import MirageGRPOConfig, MirageScriptArguments
from mirage_trl.grpo_script import run_grpo
from mirage_trl.preflight import parse_recipe_args


def main():
    # Parse the YAML and the flags; every bad setting is one line, found before any model loads.
    script_args, training_args, model_args = parse_recipe_args(
        (MirageScriptArguments, MirageGRPOConfig, ModelConfig)
    )
    run_grpo(script_args, training_args, model_args, benchmark="jigsaw")


if __name__ == "__main__":
    run_recipe(main)
