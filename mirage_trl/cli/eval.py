"""`mirage-trl eval`: batched latent decoding on a benchmark's test rows, graded as the reference does.

Defaults are the paper's test settings: sampling, temperature 0.7, top-p 0.9, 1024 new tokens, seed 42.
`--latents model zero noise mean shuffle remove` runs the latent ablation (one run per mode, same rows
and seed) and prints one table with every mode. Writes `OUT/results.json` and `OUT/completions.jsonl`
atomically; an existing non-empty `OUT` is refused without `--overwrite`.
"""

from __future__ import annotations

from pathlib import Path

from . import add_data_arguments, load_data_arguments

MODES_HELP = "model zero noise mean shuffle remove"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="evaluate a model on a benchmark (batched latent decoding, per-level tables, latent ablation)",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
    )
    p.add_argument("--model", required=True, help="model folder, PEFT adapter folder or hub name")
    p.add_argument(
        "--benchmark",
        required=True,
        metavar="NAME",
        help="vsp_planning, vsp_reasoning, vsp_grounding, jigsaw, sat or comt",
    )
    add_data_arguments(p, "test rows")
    p.add_argument("--batch-size", type=int, default=16, help="rows decoded together")
    p.add_argument("--num-samples", type=int, default=None, help="evaluate the first N rows only")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature")
    p.add_argument(
        "--top-p", type=float, default=0.9, help="nucleus sampling: keep this share of probability"
    )
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    p.add_argument("--max-new-tokens", type=int, default=1024, help="latent steps count toward it")
    p.add_argument("--seed", type=int, default=42, help="seed of the sampling generator")
    p.add_argument(
        "--latents",
        nargs="+",
        default=["model"],
        metavar="MODE",
        help=f"what is fed at latent slots, one run per mode: {MODES_HELP} (default: model)",
    )
    p.add_argument(
        "--bottleneck",
        nargs="?",
        const="image",
        choices=[
            "none",
            "image",
            "strict",
        ],  # models.settings.BOTTLENECKS (not imported: --help loads no torch)
        help="decode every mode under the visual bottleneck: 'image' (the bare flag: text after a span's start "
        "cannot see the image) or 'strict' (no text after the image can); accuracy above the best fixed answer "
        "means the latents carry the image ('none': without; default: as the model was trained)",
    )
    p.add_argument(
        "--helper-as-input",
        action="store_true",
        help="upper bound: give each row's helper images (image_output) as real input images",
    )
    p.add_argument(
        "--latent-size",
        type=int,
        default=None,
        help="latent size k, only for a folder that does not record it (e.g. one saved by the official Mirage "
        "code); it must agree otherwise",
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 or auto (default: as saved)")
    p.add_argument("--out", default=None, help="output folder for results.json and completions.jsonl")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args) -> int:

    from ..errors import MirageError
    from ..evaluation import check_latent_modes
    from ..folders import check_output_dir, out_lock
    from ..grading import check_benchmark

    # Cheap checks first: nothing is loaded before the arguments are known to be good.
    check_benchmark(args.benchmark)
    modes = check_latent_modes(args.latents)
    for flag, value in (("--batch-size", args.batch_size), ("--max-new-tokens", args.max_new_tokens)):
        if value < 1:
            raise MirageError(f"{flag} must be >= 1, got {value}")
    if args.num_samples is not None and args.num_samples < 1:
        raise MirageError(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.latent_size is not None and args.latent_size < 1:
        raise MirageError(f"--latent-size must be >= 1, got {args.latent_size}")
    if not args.greedy and not args.temperature > 0:
        raise MirageError(
            f"--temperature must be > 0 when sampling (use --greedy otherwise), got {args.temperature}"
        )
    if not 0.0 < args.top_p <= 1.0:
        raise MirageError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.out is None:
        return _evaluate(args, modes)
    check_output_dir(args.out, args.overwrite, inputs={"the model": args.model, "the data": args.data})
    with out_lock(
        args.out
    ):  # a second eval into this --out (and its partial file) is refused while this runs
        return _evaluate(args, modes)


def _evaluate(args, modes) -> int:
    import sys
    import warnings

    import torch

    from ..errors import MirageError, storage_error
    from ..evaluation import check_rows, evaluate
    from ..models.load import load_model

    dataset = load_data_arguments(args)
    rows = [dataset[i] for i in range(len(dataset))]
    if args.helper_as_input:
        from ..data.reference import helper_as_input

        for row in rows[: args.num_samples]:
            if not row["helper_images"]:
                raise MirageError(
                    f"{row['source']}:image_output: --helper-as-input needs helper images in every row"
                )
        rows = [helper_as_input(r) for r in rows]
    check_rows(args.benchmark, rows[: args.num_samples])  # before the model loads

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        model, processor = load_model(
            args.model, dtype=args.dtype, device=device, latent_size=args.latent_size, require_mirage=False
        )

    # Decoded rows are kept as they come, so a long run that fails keeps them; removed once the results are written.
    keeper = DecodedRows(Path(f"{args.out}.partial.jsonl")) if args.out is not None else None
    try:
        result = evaluate(
            model,
            processor,
            rows,
            args.benchmark,
            batch_size=args.batch_size,
            num_samples=args.num_samples,
            max_new_tokens=args.max_new_tokens,
            do_sample=not args.greedy,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
            latent_modes=modes,
            bottleneck=args.bottleneck,
            progress=not args.no_progress,
            on_decoded=keeper.write if keeper else None,
        )
        _write_results(args, result, model, device)
    except (MirageError, OSError) as exc:
        error = exc if isinstance(exc, MirageError) else storage_error(exc)  # a full disk: one line too
        note = keeper.close(failed=True) if keeper else None
        if error is None:
            if note:
                print(f"mirage-trl eval: {note}", file=sys.stderr)
            raise
        raise MirageError(f"{error}; {note}" if note else str(error)) from None
    except BaseException:
        note = keeper.close(failed=True) if keeper else None
        if note:
            print(f"mirage-trl eval: {note}", file=sys.stderr)
        raise
    if keeper:
        keeper.close(failed=False)
    return 0


class DecodedRows:
    """`<out>.partial.jsonl`: every decoded row, flushed batch by batch; kept only when the run fails."""

    def __init__(self, path: Path):
        self.path, self.count = path, 0
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "w", encoding="utf-8")

    def write(self, rows: list[dict]) -> None:
        import json

        self.file.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        self.file.flush()
        self.count += len(rows)

    def close(self, failed: bool) -> str | None:
        """Close; on failure with rows decoded, the sentence that says where they are (else the file goes)."""
        self.file.close()
        if failed and self.count:
            return f"the {self.count} rows decoded so far are kept in {self.path}"
        self.path.unlink()
        return None


def _write_results(args, result, model, device) -> None:
    import datetime

    from ..evaluation import plot_accuracy, print_tables
    from ..folders import atomic_dir
    from ..io import write_json, write_jsonl

    print_tables(result)
    if args.out is not None:
        payload = {
            "model": str(Path(args.model).resolve()) if Path(args.model).exists() else args.model,
            "data": str(Path(args.data).resolve()) if Path(args.data).exists() else args.data,
            "data_split": args.data_split,
            "root": str(Path(args.root).resolve()) if args.root else None,
            "helper_as_input": bool(args.helper_as_input),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": str(device),
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "mirage_trl_version": _version(),
            "latent_size": _latent_size(model),
            **result.to_dict(),
        }
        with atomic_dir(args.out, overwrite=args.overwrite, command="eval") as tmp:
            write_json(Path(tmp) / "results.json", payload)
            write_jsonl(Path(tmp) / "completions.jsonl", result.completion_rows())
            plot_accuracy(result, Path(tmp) / "accuracy.png")
        print(
            f"results in {args.out}/results.json, completions in {args.out}/completions.jsonl, "
            f"plot in {args.out}/accuracy.png"
        )


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("mirage-trl")
    except Exception:  # not installed (running from a source tree)
        return "unknown"


def _latent_size(model) -> int | None:
    from ..models.settings import MirageSettings

    settings = MirageSettings.of_model(model)
    return settings.latent_size if settings else None
