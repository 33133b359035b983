"""`mirage-trl tiny-model`: write a tiny random Qwen-VL (model + processor) that loads offline."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser("tiny-model", help="write a tiny random Qwen-VL for offline tests and the demo")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--model-type", default="qwen2_5_vl", choices=["qwen2_5_vl", "qwen2_vl", "qwen3_vl"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..models.tiny import save_tiny_model

    out = save_tiny_model(args.out, model_type=args.model_type, seed=args.seed, overwrite=args.overwrite)
    print(f"tiny {args.model_type} written to {out}")
    return 0
