"""Time per GRPO step: `MirageGRPOTrainer` (latent rollouts, latents recomputed in training) vs plain TRL `GRPOTrainer`.

    python bench/grpo.py            # hidden 256, 4 layers, 4 prompts x 2 completions of 64 tokens
    python bench/grpo.py --quick    # the tiny test model, seconds
    python bench/grpo.py --json out.json

Same random Qwen2.5-VL, same prompts (text + one image each), same reward (format), same GRPO
settings, float32 on CPU. EOS and the vision placeholders are made impossible in both (a -30 logit bias through a hook
on the LM head) so every completion runs to `max_completion_length` in both trainers. The Mirage model
has the `<|latent_start|>` logit raised (`--start-bias`) so rollouts open latent spans (reported
as spans per completion); `--start-bias -30` measures the overhead without spans. Each step is split into

* generation: `_generate_single_turn` (TRL's `model.generate` vs `generate_with_latents`);
* scoring: the rest of `_generate_and_score_completions` (prompt processing, rewards, advantages);
* training: the remainder of `training_step` (forward with log-probs, loss, backward).

The two trainers run in alternating rounds (machine load hits both alike); each round is a fresh
`train()` of `--steps` steps whose first step is dropped; medians are reported. Goal: total ratio <= 1.2.
A third trainer runs the off-by-default `rollout_latents="constant"` (the rollout's latents fed again as constants:
one training pass, no gradient through the latents), reported as `ratio_constant`.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GOAL = 1.2


def build(quick: bool, start_bias: float):
    import torch

    from mirage_trl.models.prepare import add_latent_tokens
    from mirage_trl.models.tiny import build_tiny_model

    size = (
        {}
        if quick
        else dict(
            hidden_size=256,
            intermediate_size=1024,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    model, processor = build_tiny_model(seed=0, **size)
    tokens = add_latent_tokens(processor, model, latent_size=4)
    tok = processor.tokenizer
    eos = {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}
    eos |= set(
        model.generation_config.eos_token_id
        if isinstance(model.generation_config.eos_token_id, list)
        else [model.generation_config.eos_token_id]
    )
    plain_bias = torch.zeros(model.lm_head.weight.shape[0])
    # A random model samples any id: also keep out the vision placeholders (a sampled <|image_pad|> in a completion
    # breaks the training forward's image-token count, in TRL's trainer as in ours).
    vision = {tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>")}
    plain_bias[sorted(i for i in eos | vision if i is not None)] = -30.0
    latent_bias = plain_bias.clone()
    latent_bias[tokens.start_id] = start_bias
    return (
        copy.deepcopy(model),
        copy.deepcopy(model),
        processor,
        tokens,
        plain_bias,
        latent_bias,
        copy.deepcopy(model),
    )


def bias_logits(trainer, bias) -> None:
    """Add `bias` to the LM head's output of the trainer's model (after PEFT wrapped it: a head with
    trainable latent rows computes its own output, so the hook goes on the outermost head)."""
    from mirage_trl.models.families import unwrap

    head = unwrap(trainer.model).get_output_embeddings()
    head.register_forward_hook(lambda m, a, out: out + bias.to(out.device, out.dtype))


def rows(folder: Path, n: int):
    import numpy as np
    from PIL import Image

    out = []
    for i in range(n):
        path = folder / f"{i}.png"
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 256, size=(112, 112, 3), dtype=np.uint8)).save(path)
        content = [
            {"type": "image", "text": None},
            {"type": "text", "text": f"Plan {i}: find the shortest safe path to the goal. " * 2},
        ]
        out.append(
            {
                "messages": [{"role": "user", "content": content}],
                "images": [str(path)],
                "benchmark": "vsp_planning",
                "source": f"bench:{i}",
            }
        )
    return out


def instrument(trainer):
    """Wrap the instance's methods to time generation, scoring and the whole training step."""
    times = {"generation": [], "score": [], "step": []}

    def wrap(name, key):
        original = getattr(trainer, name)

        def timed(*args, **kwargs):
            t = time.perf_counter()
            result = original(*args, **kwargs)
            times[key].append(time.perf_counter() - t)
            return result

        setattr(trainer, name, timed)

    times["spans"] = []
    original_generate = trainer._generate

    def counted(prompts):
        result = original_generate(prompts)
        times["spans"].extend(sum(1 for t in ids if t == trainer._start_id) for ids in result[1])
        return result

    trainer._generate = counted
    wrap("_generate_single_turn", "generation")
    wrap("_generate_and_score_completions", "score")
    wrap("training_step", "step")
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--prompts", type=int, default=None, help="prompts per step (x 2 completions)")
    parser.add_argument("--completion-len", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="steps per round (the first is dropped)")
    parser.add_argument(
        "--start-bias", type=float, default=4.0, help="logit bias of <|latent_start|> (Mirage model)"
    )
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument(
        "--lora",
        type=int,
        default=0,
        help="LoRA rank on every linear layer of the language model (0: full fine-tuning)",
    )
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu", help="cuda: the GPU run of bench/gpu_runbook.sh"
    )
    args = parser.parse_args(argv)
    prompts = args.prompts or (2 if args.quick else 4)
    length = args.completion_len or (16 if args.quick else 64)
    rounds = args.rounds or (1 if args.quick else 3)
    steps = args.steps or (2 if args.quick else 3)

    import torch
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from mirage_trl.configs import MirageGRPOConfig
    from mirage_trl.data.images import load_image
    from mirage_trl.rewards import format_reward
    from mirage_trl.trainers.grpo import MirageGRPOTrainer

    if args.threads:
        torch.set_num_threads(args.threads)
    plain_model, mirage_model, processor, tokens, plain_bias, latent_bias, constant_model = build(
        args.quick, args.start_bias
    )
    tmp = Path(tempfile.mkdtemp(prefix="bench_grpo_"))
    data = rows(tmp, prompts)
    plain_data = [{"prompt": r["messages"], "images": [load_image(p) for p in r["images"]]} for r in data]
    common = dict(
        per_device_train_batch_size=2 * prompts,
        num_generations=2,
        max_completion_length=length,
        max_steps=steps,
        use_cpu=args.device == "cpu",
        bf16=False,
        report_to="none",
        logging_steps=1000,
        save_strategy="no",
        learning_rate=1e-5,
        seed=0,
        disable_tqdm=True,
    )
    # under the name the installed transformers knows (5.2x renamed it and warns on the old one)
    new_name = "activation_checkpointing" in {f.name for f in dataclasses.fields(GRPOConfig)}
    common["activation_checkpointing" if new_name else "gradient_checkpointing"] = args.gradient_checkpointing
    peft = None
    if args.lora:
        from peft import LoraConfig

        peft = dict(
            r=args.lora,
            lora_alpha=2 * args.lora,
            target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
        )
    plain = GRPOTrainer(
        plain_model,
        peft_config=LoraConfig(**peft) if peft else None,
        reward_funcs=[format_reward],
        args=GRPOConfig(output_dir=str(tmp / "p"), **common),
        train_dataset=Dataset.from_list(plain_data),
        processing_class=processor,
    )
    mirage = MirageGRPOTrainer(
        mirage_model,
        args=MirageGRPOConfig(output_dir=str(tmp / "m"), reward_names=["format"], latent_size=4, **common),
        train_dataset=Dataset.from_list(data),
        processing_class=processor,
        peft_config=LoraConfig(**peft) if peft else None,
    )
    # The off-by-default option: the rollout's latents fed again as constants (one training pass, no gradient
    # through the latents).
    constant = MirageGRPOTrainer(
        constant_model,
        args=MirageGRPOConfig(
            output_dir=str(tmp / "c"),
            reward_names=["format"],
            latent_size=4,
            rollout_latents="constant",
            **common,
        ),
        train_dataset=Dataset.from_list(data),
        processing_class=processor,
        peft_config=LoraConfig(**peft) if peft else None,
    )
    bias_logits(plain, plain_bias)
    bias_logits(mirage, latent_bias)
    bias_logits(constant, latent_bias)
    trainers = (("plain", plain), ("mirage", mirage), ("constant", constant))
    timings = {name: instrument(trainer) for name, trainer in trainers}
    plain._start_id = mirage._start_id = constant._start_id = tokens.start_id
    for _ in range(rounds):
        for name, trainer in trainers:
            before = {k: len(v) for k, v in timings[name].items()}
            trainer.train()
            for k, v in timings[name].items():  # drop the first (warm-up) step of the round
                if k != "spans":
                    del v[before[k]]

    def split(t):
        gen = statistics.median(t["generation"])
        step = statistics.median(t["step"])
        score = statistics.median(t["score"])
        return {"generation_s": gen, "scoring_s": score - gen, "training_s": step - score, "step_s": step}

    result = {name: split(timings[name]) for name in ("plain", "mirage", "constant")}
    for key, name in (("ratio", "mirage"), ("ratio_constant", "constant")):
        result[key] = {k.replace("_s", ""): result[name][k] / result["plain"][k] for k in result["plain"]}
    result["mirage_spans_per_completion"] = statistics.mean(timings["mirage"]["spans"])
    result["constant_spans_per_completion"] = statistics.mean(timings["constant"]["spans"])
    result["plain_spans_per_completion"] = statistics.mean(timings["plain"]["spans"])  # the plain model: 0
    result["setup"] = dict(
        quick=args.quick,
        completions_per_step=2 * prompts,
        completion_len=length,
        rounds=rounds,
        steps_per_round=steps,
        start_bias=args.start_bias,
        threads=torch.get_num_threads(),
        device=torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        gradient_checkpointing=args.gradient_checkpointing,
        lora_rank=args.lora,
    )
    result["goal"] = GOAL
    result["meets_goal"] = result["ratio"]["step"] <= GOAL
    result["meets_goal_constant"] = result["ratio_constant"]["step"] <= GOAL

    print(f"{'':10s} {'generation':>11s} {'scoring':>9s} {'training':>9s} {'step':>9s}")
    for name in ("plain", "mirage", "constant"):
        r = result[name]
        print(
            f"{name:10s} {r['generation_s']:10.3f}s {r['scoring_s']:8.3f}s {r['training_s']:8.3f}s {r['step_s']:8.3f}s"
        )
    for key, label, spans in (
        ("ratio", "ratio", "mirage_spans_per_completion"),
        ("ratio_constant", "constant", "constant_spans_per_completion"),
    ):
        r = result[key]
        print(
            f"{label + ' / plain':16s} {r['generation']:4.2f}x {r['scoring']:8.2f}x {r['training']:8.2f}x "
            f"{r['step']:8.2f}x   (goal <= {GOAL}x; {result[spans]:.2f} latent spans per completion)"
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
