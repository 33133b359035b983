"""Mirage stage 3 on SAT: GRPO with latent rollouts from a stage-2 output; reward 0.9 x accuracy + 0.1 x format.

Usage:
    # tiny offline model on CPU (after `make demo` has made outputs/demo/stage2)
    accelerate launch --cpu recipes/grpo_sat.py --config recipes/tiny/grpo/config_vsp_smoke.yaml --dataset_name <your sat JSONL>
    # Qwen2.5-VL-7B-Instruct, LoRA, one or more GPUs with DeepSpeed ZeRO-2
    accelerate launch --config_file zero_configs/zero2.yaml recipes/grpo_sat.py \
        --config recipes/Qwen2.5-VL-7B-Instruct/grpo/config_sat_lora.yaml
Any YAML key can be overridden on the command line, e.g. `--num_generations 8`.
"""

import functools

from mirage_grpo import ARGS
from mirage_grpo import main as steps

from mirage_trl.run import launch

# The steps are recipes/mirage_grpo.py's; this script names its benchmark (a --benchmark flag wins).
main = functools.partial(steps, benchmark="sat")

if __name__ == "__main__":
    launch(main, ARGS)
