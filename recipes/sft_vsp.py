"""Baseline on VSP spatial planning / reasoning (benchmark inferred from the rows): text-only SFT with plain TRL `SFTTrainer` (`<output_image>` markers and helper
images removed; direct or CoT as the data file is), or the upper bound with `--helper_as_input true`
(helper images given as real input images).

Usage:
    # tiny offline model on CPU
    accelerate launch --cpu recipes/sft_vsp.py --config recipes/tiny/sft/config_vsp_smoke.yaml
    # Qwen2.5-VL-7B-Instruct, LoRA, one or more GPUs with DeepSpeed ZeRO-2
    accelerate launch --config_file zero_configs/zero2.yaml recipes/sft_vsp.py \
        --config recipes/Qwen2.5-VL-7B-Instruct/sft/config_vsp_lora.yaml --dataset_name <vsp train jsonl> --output_dir <dir>
    # upper bound: add --helper_as_input true
Any YAML key can be overridden on the command line, e.g. `--per_device_train_batch_size 4`.
"""

from text_sft import ARGS
from text_sft import main as run

from mirage_trl.preflight import parse_recipe_args
from mirage_trl.run import run_recipe

BENCHMARK = None  # inferred from the rows: vsp_planning, vsp_reasoning or vsp_grounding (--benchmark wins)


def main(script_args, training_args, model_args):
    """The steps are recipes/text_sft.py's: check, data, model, trainer, train (auto-resume), save, card, push."""
    return run(script_args, training_args, model_args, benchmark=BENCHMARK)


if __name__ == "__main__":
    run_recipe(lambda: main(*parse_recipe_args(ARGS)))
