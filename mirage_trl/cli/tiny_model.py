"""`mirage-trl tiny-model`: write a tiny random Qwen-VL (model + processor) that loads offline."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser("tiny-model", help="write a tiny random Qwen-VL for offline tests and the demo")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--model-type", default="qwen2_5_vl", choices=["qwen2_5_vl", "qwen2_vl", "qwen3_vl"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument(
        "--config",
        help="a config.json whose architecture to build instead (random weights, the tiny tokenizer), e.g. "
        "bench/configs/qwen2_5_vl_7b_instruct.json for 7B-shaped runs",
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.set_defaults(func=run)


def run(args) -> int:
    from ..io import check_output_dir

    check_output_dir(args.out, args.overwrite)  # before torch loads
    import torch

    from ..models.tiny import save_tiny_model

    out = save_tiny_model(
        args.out,
        model_type=args.model_type,
        seed=args.seed,
        overwrite=args.overwrite,
        config_file=args.config,
        dtype=getattr(torch, args.dtype),
    )
    what = f"{args.model_type}" if args.config is None else f"model with the architecture of {args.config}"
    print(f"random {what} written to {out}")
    return 0
