"""`mirage-trl data jigsaw`: generate BLINK-style Jigsaw puzzles from a folder of images."""

from __future__ import annotations

from .data import add_format_arguments, publish, rows_folder


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "jigsaw",
        help="generate Jigsaw puzzles (reference JSONL + PNGs) from a folder of images",
        description="Cut a gray hole out of each image, offer the true patch and a distractor as A/B, "
        "and write reference-format JSONL with the completed image as the helper image.",
    )
    p.add_argument("--images", required=True, help="folder of source .png/.jpg images (searched recursively)")
    p.add_argument("--num-samples", type=int, required=True, help="number of puzzles to write")
    p.add_argument(
        "--seed", type=int, default=0, help="random seed; the same seed gives the same files (default 0)"
    )
    p.add_argument("--out", required=True, help="output folder (gets jigsaw.jsonl and images/)")
    p.add_argument(
        "--patch-frac",
        type=float,
        default=0.25,
        help="hole side as a fraction of the shorter image side (default 0.25, at most 1/3)",
    )
    p.add_argument(
        "--max-side", type=int, default=512, help="downscale source images to this longest side (default 512)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    add_format_arguments(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..data.jigsaw import generate_jigsaw
    from ..folders import check_output_dir

    inputs = {"--images": args.images}
    if args.format == "jsonl":
        check_output_dir(args.out, args.overwrite, inputs=inputs)  # before any work
    with rows_folder(args, inputs=inputs) as (out, overwrite):
        path = generate_jigsaw(
            args.images,
            args.num_samples,
            args.seed,
            out,
            patch_frac=args.patch_frac,
            max_side=args.max_side,
            overwrite=overwrite,
        )
        if args.format == "jsonl":
            print(f"wrote {args.num_samples} Jigsaw rows to {path}")
        settings = {"num_samples": args.num_samples, "seed": args.seed, "patch_frac": args.patch_frac,
                    "max_side": args.max_side}  # fmt: skip
        publish(
            args, path, "train", "Jigsaw puzzles (BLINK-style)", settings, "data jigsaw", benchmark="jigsaw"
        )
    return 0
