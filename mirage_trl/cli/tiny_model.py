"""`mirage-trl tiny-model`: write a tiny random vision-language model (model + processor) of a supported
family that loads offline."""

from __future__ import annotations

from pathlib import Path

from ..errors import MirageError
from ..models.tiny import IMAGE_PIXELS, TOKENIZER_CORPORA  # module top imports nothing heavy


class _ModelTypes:
    """The supported model types, read from the model families when argparse first needs them (to check a
    value or to print --help): the families import torch, which `mirage-trl --help` must not wait for."""

    def __iter__(self):
        from ..models.families import SUPPORTED_MODEL_TYPES

        return iter(SUPPORTED_MODEL_TYPES)

    def __contains__(self, value) -> bool:
        return value in list(self)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "tiny-model", help="write a tiny random vision-language model for offline tests and the demo"
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--model-type",
        default="qwen2_5_vl",
        choices=_ModelTypes(),
        metavar="MODEL_TYPE",
        help="architecture family, one of: %(choices)s; qwen3_vl's random vision tower is the one that can tell where a tile is",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument(
        "--config",
        help="a config.json whose architecture to build instead (random weights, the tiny tokenizer), e.g. "
        "qwen2_5_vl_7b_instruct (the shipped 7B config, by name) for 7B-shaped runs",
    )
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="dtype of the saved weights",
    )
    p.add_argument(
        "--tokenizer-corpus",
        default="demo",
        choices=TOKENIZER_CORPORA,
        help="'benchmarks': BPE learnt on real VSP prompts and answers (a planning prompt is a few tokens)",
    )
    p.add_argument("--vocab-size", type=int, default=600, help="size of the trained BPE vocabulary")
    p.add_argument(
        "--image-pixels",
        default="demo",
        choices=IMAGE_PIXELS,
        help="'tiles': keep maps drawn with --tile-px 28 as drawn (one vision token per tile)",
    )
    p.add_argument("--hidden-size", type=int, help="text hidden size (default 64)")
    p.add_argument("--layers", type=int, help="text decoder layers (default 2)")
    p.set_defaults(func=run)


def tiny_model_kwargs(args) -> dict:
    kw = dict(
        tokenizer_corpus=args.tokenizer_corpus, vocab_size=args.vocab_size, image_pixels=args.image_pixels
    )
    if not 300 <= args.vocab_size <= 65536:
        raise MirageError(f"--vocab-size {args.vocab_size}: must be from 300 to 65536")
    if args.hidden_size is not None:
        if args.hidden_size < 16 or args.hidden_size % 16:
            raise MirageError(f"--hidden-size {args.hidden_size}: must be a multiple of 16, at least 16")
        kw["hidden_size"] = args.hidden_size
        kw["intermediate_size"] = 2 * args.hidden_size
    if args.layers is not None:
        if not 1 <= args.layers <= 64:
            raise MirageError(f"--layers {args.layers}: must be from 1 to 64")
        kw["num_hidden_layers"] = args.layers
    return kw


def run(args) -> int:
    from ..folders import check_output_dir

    check_output_dir(args.out, args.overwrite)  # before torch loads
    if args.config is not None and not Path(args.config).is_file():
        from ..shipped import shipped

        named = shipped("model_configs") / f"{args.config.removesuffix('.json')}.json"
        if not named.is_file():
            names = ", ".join(sorted(p.stem for p in shipped("model_configs").glob("*.json")))
            raise MirageError(
                f"--config {args.config}: no such file or shipped model config (shipped: {names})"
            )
        args.config = str(named)
    import torch

    from ..models.tiny import save_tiny_model

    out = save_tiny_model(
        args.out,
        model_type=args.model_type,
        seed=args.seed,
        overwrite=args.overwrite,
        config_file=args.config,
        dtype=getattr(torch, args.dtype),
        **tiny_model_kwargs(args),
    )
    what = f"{args.model_type}" if args.config is None else f"model with the architecture of {args.config}"
    print(f"random {what} written to {out}")
    return 0
