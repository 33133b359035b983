"""Baseline on Jigsaw (BLINK): text-only SFT with plain TRL `SFTTrainer` (`<output_image>` markers and helper
images removed; direct or CoT as the data file is), or the upper bound with `--helper_as_input true`
(helper images given as real input images).

Usage:
    # tiny offline model on CPU
    accelerate launch --cpu recipes/text_sft_jigsaw.py --config recipes/tiny/text_sft/config_vsp_smoke.yaml \
        --dataset_name my_jigsaw_train.jsonl
    # Qwen2.5-VL-7B-Instruct, LoRA, one or more GPUs with DeepSpeed ZeRO-2
    accelerate launch --config_file zero_configs/zero2.yaml recipes/text_sft_jigsaw.py \
        --config recipes/Qwen2.5-VL-7B-Instruct/text_sft/config_vsp_lora.yaml --dataset_name <jigsaw train jsonl> --output_dir <dir>
    # upper bound: add --helper_as_input true
Any YAML key can be overridden on the command line, e.g. `--per_device_train_batch_size 4`.
"""

import functools

from text_sft import ARGS
from text_sft import main as steps

from mirage_trl.run import launch

# The steps are recipes/text_sft.py's; this script names its benchmark (a --benchmark flag wins).
main = functools.partial(steps, benchmark="jigsaw")

if __name__ == "__main__":
    launch(main, ARGS)
