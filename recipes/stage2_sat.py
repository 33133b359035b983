"""Mirage stage 2 on SAT: text loss with gradients through self-generated latents (start from a stage-1 output).

Usage:
    # tiny offline model on CPU, on your own reference-format rows
    accelerate launch --cpu recipes/stage2_sat.py --config recipes/tiny/stage2/config_vsp_smoke.yaml \
        --dataset_name my_sat_train.jsonl
    # Qwen2.5-VL-7B-Instruct, LoRA, one or more GPUs with DeepSpeed ZeRO-2
    accelerate launch --config_file zero_configs/zero2.yaml recipes/stage2_sat.py \
        --config recipes/Qwen2.5-VL-7B-Instruct/stage2/config_sat_lora.yaml
Any YAML key can be overridden on the command line, e.g. `--per_device_train_batch_size 4`.
"""

import functools

from mirage_sft import ARGS
from mirage_sft import main as steps

from mirage_trl.run import launch

# The steps are recipes/mirage_sft.py's; this script names its stage and its benchmark (a --benchmark flag wins).
main = functools.partial(steps, stage=2, benchmark="sat", recipe=__file__)

if __name__ == "__main__":
    launch(main, ARGS)
