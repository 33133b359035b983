"""Baseline on VSP spatial planning / reasoning (benchmark inferred from the rows): text-only SFT with plain TRL `SFTTrainer` (`<output_image>` markers and helper
images removed; direct or CoT as the data file is), or the upper bound with `--helper_as_input true`
(helper images given as real input images).

Usage:
    # tiny offline model on CPU
    accelerate launch --cpu recipes/sft_vsp.py --config recipes/vsp/sft_tiny.yaml
    # Qwen2.5-VL-7B-Instruct, LoRA, one or more GPUs with DeepSpeed ZeRO-2
    accelerate launch --config_file zero_configs/zero2.yaml recipes/sft_vsp.py \
        --config recipes/Qwen2.5-VL-7B-Instruct/sft_vsp_lora.yaml --dataset_name <vsp train jsonl> --output_dir <dir>
    # upper bound: add --helper_as_input true
Any YAML key can be overridden on the command line, e.g. `--per_device_train_batch_size 4`.
"""

from trl import ModelConfig, SFTConfig

from mirage_trl.baselines import BaselineScriptArguments, run_text_sft
from mirage_trl.cli import run_recipe
from mirage_trl.preflight import parse_recipe_args


def main():
    # Parse the YAML and the flags; every bad setting is one line, found before any model loads.
    script_args, training_args, model_args = parse_recipe_args(
        (BaselineScriptArguments, SFTConfig, ModelConfig)
    )
    run_text_sft(script_args, training_args, model_args, benchmark=None)


if __name__ == "__main__":
    run_recipe(main)
