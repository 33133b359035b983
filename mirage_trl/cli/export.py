"""`mirage-trl export`: a trained Mirage model (full, LoRA adapter or checkpoint-N) as an adapter or a
merged model, with processor, Mirage settings, safetensors and a model card; optionally uploaded."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="export a trained Mirage model (adapter or merged) with its processor and model card; optionally push it",
        description=(
            "Export a Mirage training output (full model, LoRA adapter, or a checkpoint-N folder). An adapter is "
            "written as an adapter (LoRA weights + the trained latent-token rows) unless --merge; a full model is "
            "re-saved. The folder is written atomically (temporary folder, then rename)."
        ),
    )
    p.add_argument(
        "--model", required=True, help="training output folder, adapter folder or checkpoint-N folder"
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--merge", action="store_true", help="merge a LoRA adapter into its base model (a full model)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument(
        "--eval-json", default=None, help="results.json of `mirage-trl eval`: metrics for the model card"
    )
    p.add_argument(
        "--dataset", action="append", default=None, help="dataset name for the model card (repeatable)"
    )
    p.add_argument(
        "--latent-size",
        type=int,
        default=None,
        help="latent size k, only for a folder that does not record it (it must agree otherwise)",
    )
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="cast the exported weights (default: as saved; merging happens before the cast)",
    )
    p.add_argument(
        "--push-to-hub", metavar="REPO", default=None, help="upload the export to this Hub model repo"
    )
    p.add_argument("--private", action="store_true", help="create the Hub repo private")
    p.add_argument("--revision", default=None, help="Hub branch to upload to (created if missing)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..card import launch_line
    from ..errors import MirageError
    from ..export import export_model

    if (args.private or args.revision) and not args.push_to_hub:
        raise MirageError("--private/--revision: only with --push-to-hub REPO")
    out = export_model(
        args.model,
        args.out,
        merge=args.merge,
        overwrite=args.overwrite,
        eval_json=args.eval_json,
        dtype=args.dtype,
        latent_size=args.latent_size,
        push_to_hub=None,
        launch_lines=[launch_line()],
        datasets=args.dataset,
    )
    print(f"exported {args.model} to {out}")
    if args.push_to_hub:
        from ..hub import push_folder

        url = push_folder(out, args.push_to_hub, private=args.private, revision=args.revision)
        print(f"pushed {out} to {args.push_to_hub}: {url}")
    return 0
