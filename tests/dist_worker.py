"""Worker for tests/test_distributed.py: two steps of MirageSFTTrainer (stage 1, or stage 2 with a method) on the tiny model.

Launch (one or two real processes on CPU, gloo):
    torchrun --nproc_per_node 2 tests/dist_worker.py --out result.json --workdir DIR [--backend deepspeed|ddp]

The global batch is always the same 4 rows (per-device batch = 4 / world size), in dataset order, and
both steps use it (max_steps=2 over a 4-row dataset), so step 1's loss checks the forward and the
loss normalisation across ranks, and step 2's loss checks that the ZeRO-2 / DDP update equals the
single-process one. Rank 0 writes the logged losses and gradient norms as JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # helpers
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the package, from a clean clone

GLOBAL_BATCH = 4

ZERO2 = {
    "zero_optimization": {"stage": 2, "overlap_comm": False, "contiguous_gradients": True},
    "train_micro_batch_size_per_gpu": "auto",
    "train_batch_size": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "bf16": {"enabled": False},
    "fp16": {"enabled": False},
    "zero_allow_untested_optimizer": True,
}


ZERO3 = {
    **ZERO2,
    "zero_optimization": {"stage": 3, "overlap_comm": False, "contiguous_gradients": True},
}


def rows_for(workdir: Path) -> list[dict]:
    """4 rows with 1, 2, 2, 1 latent spans and different lengths: any 2 + 2 split that keeps dataset
    order ((0, 1) + (2, 3) or (0, 2) + (1, 3)) gives each rank 3 spans, so the per-rank mean of the
    cosine term equals the global mean (the trainer's convention, see tests/trainers/test_sft.py's GA test)."""
    from helpers import four_rows, make_images, make_row

    img = make_images(workdir)
    base = four_rows(img)
    return [
        base[1],  # 1 span
        base[3],  # 2 spans, no input image
        make_row(
            "Which way leads to the goal? Think step by step.",
            "<think> DOWN <output_image> then RIGHT <output_image> lands on the Target. </think> \\boxed{DR}",
            [img["in2"]],
            [img["h1"], img["h0"]],
            "dist:3",
        ),
        make_row(
            "Go.",
            "<output_image> "
            + "Moving to [(3,2),Ice] keeps me on the safe path, next moving to [(0,2),Target] ensures "
            "success; falling into a hole results in defeat. " * 3 + "\\boxed{A}",
            [img["in0"]],
            [img["h3"]],
            "dist:4",
        ),  # long: the ranks hold very different token counts, so CE must be normalised over all ranks
    ]


GATHERED = {"bytes": 0, "calls": 0}


def _count_gathers() -> None:
    """Count what ZeRO-3 all-gathers (the bytes of every gathered output), through DeepSpeed's communication
    backend: the traffic figure of docs/benchmarks.md (stage 2 gathers the weights once per round)."""
    from deepspeed.comm.torch import TorchBackend

    def counting(method, output_of):
        def wrapper(self, *args, **kwargs):
            out = output_of(*args, **kwargs)
            for t in out if isinstance(out, (list, tuple)) else [out]:
                GATHERED["bytes"] += t.numel() * t.element_size()
            GATHERED["calls"] += 1
            return method(self, *args, **kwargs)

        return wrapper

    TorchBackend.all_gather_into_tensor = counting(
        TorchBackend.all_gather_into_tensor, lambda output_tensor, *a, **kw: output_tensor
    )
    TorchBackend.all_gather = counting(TorchBackend.all_gather, lambda tensor_list, *a, **kw: tensor_list)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--backend", choices=("deepspeed", "zero3", "ddp"), default="deepspeed")
    parser.add_argument(
        "--stage2-method", default=None, help="run stage 2 with this method instead of stage 1"
    )
    parser.add_argument(
        "--lora", action="store_true", help="train a LoRA adapter (PEFT) instead of every weight"
    )
    parser.add_argument(
        "--save",
        action="store_true",
        help="save a checkpoint every step and the model at the end (output_dir)",
    )
    parser.add_argument("--resume", default=None, help="resume from this checkpoint folder")
    opts = parser.parse_args()

    import torch
    import torch.distributed as dist
    from datasets import Dataset

    from mirage_trl.configs import MirageSFTConfig
    from mirage_trl.data.reference import _features
    from mirage_trl.models.families import full_shape, unwrap
    from mirage_trl.models.load import load_for_training
    from mirage_trl.models.tiny import build_tiny_model, save_tiny_model
    from mirage_trl.trainers.sft import MirageSFTTrainer

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    torch.set_num_threads(1)
    workdir = Path(opts.workdir) / f"rank{rank}"  # every rank renders the same deterministic images
    rows = rows_for(workdir)
    # written before the ZeRO-3 config exists (under it, a model built from its config is born partitioned)
    folder = save_tiny_model(workdir / "tiny", seed=0) if opts.backend == "zero3" else None
    args = MirageSFTConfig(
        # one folder for every rank when saving: each rank writes its ZeRO shard into the same checkpoint
        output_dir=str(Path(opts.workdir) / "out" if opts.save else workdir / "out"),
        use_cpu=True,
        bf16=False,
        report_to=[],
        save_strategy="steps" if opts.save else "no",
        save_steps=1,
        gradient_checkpointing=False,
        per_device_train_batch_size=GLOBAL_BATCH // world,
        gradient_accumulation_steps=1,
        max_steps=2,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        optim="adamw_torch",
        logging_steps=1,
        disable_tqdm=True,
        train_sampling_strategy="sequential",
        deepspeed={"deepspeed": ZERO2, "zero3": ZERO3}.get(opts.backend),
        ddp_backend="gloo" if world > 1 else None,
        seed=0,
        **({"stage": 2, "stage2_method": opts.stage2_method} if opts.stage2_method else {}),
    )
    if opts.backend == "zero3":
        # loaded as a recipe loads it, after the config: under ZeRO-3 `from_pretrained` partitions the weights
        # as it reads them, so every shape read after this point sees partitioned parameters
        # DeepSpeed's process group first, as `accelerate launch` sets it up (torchrun does not): ZeRO-3 partitions
        # the weights across it while `from_pretrained` reads them
        import deepspeed

        _count_gathers()
        deepspeed.init_distributed(dist_backend="gloo")
        model, processor = load_for_training(str(folder), args)
    else:
        model, processor = build_tiny_model(seed=0)
    peft_config = None
    if opts.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    trainer = MirageSFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows, features=_features()),
        processing_class=processor,
        peft_config=peft_config,
    )
    trainer.train(resume_from_checkpoint=opts.resume)
    if opts.save:
        trainer.save_model()
    logs = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    result = {
        "world_size": world,
        "backend": opts.backend,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "num_processes": trainer.accelerator.num_processes,
        "loss": [h["loss"] for h in logs],
        "grad_norm": [h.get("grad_norm") for h in logs],
        "ce": [h.get("ce") for h in logs],
        "latent_loss": [h.get("latent_loss") for h in logs],
        # the vocabulary as the trainer sees it (a partitioned parameter's local shape is (0,))
        "embedding_rows": int(full_shape(unwrap(trainer.model).get_input_embeddings().weight)[0]),
        "tokenizer": len(processor.tokenizer),
        # ZeRO-3 only: all-gathered bytes and calls over the whole run (2 steps), this rank's
        "allgather_bytes": GATHERED["bytes"],
        "allgather_calls": GATHERED["calls"],
    }
    if rank == 0:
        Path(opts.out).write_text(json.dumps(result))
        print(json.dumps(result))
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
