"""`mirage-trl analyze-latents`: how close are generated latents to image features vs text embeddings?

Writes OUT/analysis.json (nearest-neighbour and centroid cosine figures per space), OUT/projection.png (matplotlib)
(2-D PCA of text embeddings, image features and latents, with the numbers) and OUT/vectors.safetensors
(the latents and image features, for your own analysis), atomically.
"""

from __future__ import annotations

from . import add_data_arguments, load_data_arguments


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "analyze-latents",
        help="compare generated latents with the image-feature and text-embedding spaces (numbers + PNG)",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
    )
    p.add_argument("--model", required=True, help="model folder, PEFT adapter folder or hub name")
    add_data_arguments(p, "rows to decode (input and/or helper images)")
    p.add_argument("--benchmark", default=None, help="benchmark of the rows (inferred for VSP)")
    p.add_argument("--num-samples", type=int, default=32, help="rows to decode (the first N)")
    p.add_argument("--batch-size", type=int, default=16, help="rows decoded together")
    p.add_argument("--max-new-tokens", type=int, default=256, help="latent steps count toward it")
    # the same sampling default as `mirage-trl eval`, so an analysis looks at the latents eval graded
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    p.add_argument(
        "--sample",
        action="store_true",
        help="sample with --temperature / --top-p (the default; kept for old scripts)",
    )
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature")
    p.add_argument(
        "--top-p", type=float, default=0.9, help="nucleus sampling: keep this share of probability"
    )
    p.add_argument("--seed", type=int, default=42, help="seed of the sampling generator")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when there is one)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: the checkpoint's)")
    p.add_argument(
        "--out", required=True, help="output folder (analysis.json, vectors.safetensors, the projection plot)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from ..errors import MirageError
    from ..folders import check_output_dir

    if args.num_samples < 1 or args.batch_size < 1 or args.max_new_tokens < 1:
        raise MirageError("--num-samples, --batch-size and --max-new-tokens must be >= 1")
    check_output_dir(args.out, args.overwrite, inputs={"the model": args.model, "the data": args.data})

    import torch
    from safetensors.torch import save_file

    from ..analysis import analyze_latents, draw_projection, summary_lines
    from ..folders import atomic_dir
    from ..io import write_json
    from ..models.load import load_model

    data = load_data_arguments(args)
    rows = [data[i] for i in range(min(args.num_samples, len(data)))]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, processor = load_model(args.model, dtype=args.dtype, device=device, require_mirage=False)
    result = analyze_latents(
        model, processor, rows, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
        do_sample=not args.greedy, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
    )  # fmt: skip
    lines = summary_lines(result.stats)
    with atomic_dir(args.out, overwrite=args.overwrite, command="analyze-latents") as tmp:
        tmp = Path(tmp)
        write_json(tmp / "analysis.json", {"model": args.model, "data": args.data, **result.stats})
        draw_projection(result.projection, tmp / "projection.png", lines)
        save_file(
            {"latents": result.latents.contiguous(), "image_features": result.image_features.contiguous()},
            str(tmp / "vectors.safetensors"),
        )
    for line in lines:
        print(line)
    print(f"closer to: {result.stats['closer_to']}; written to {args.out}")
    return 0
