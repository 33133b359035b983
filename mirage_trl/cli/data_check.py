"""`mirage-trl data check`: load and validate a reference-format JSONL file and summarise it."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "check",
        help="validate a reference-format JSONL file (fields, markers, image paths) and summarise it",
        description="Load a JSONL file the way training does; any malformed row is reported as file:line:field.",
    )
    p.add_argument("--data", required=True, help="the JSONL file")
    p.add_argument(
        "--root", default=None, help="folder the image paths are relative to (default: the reference layout)"
    )
    p.add_argument(
        "--benchmark",
        default=None,
        help="vsp_planning, vsp_reasoning, vsp_grounding, jigsaw, sat or comt (default: infer VSP)",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    from collections import Counter

    from rich.console import Console
    from rich.table import Table

    from ..data.reference import load_rows
    from ..errors import MirageError
    from ..grading import check_benchmark

    if args.benchmark is not None:
        try:
            check_benchmark(args.benchmark)
        except MirageError as e:
            raise MirageError(f"--benchmark: {e}") from None
    rows = load_rows(args.data, root=args.root, benchmark=args.benchmark, check_images=True)
    # Decode every image now: a broken or truncated file fails here, not halfway through training.
    from ..data.images import load_image

    for r in rows:
        for field, column in (("image_input", "images"), ("image_output", "helper_images")):
            for path in r[column]:
                load_image(path, source=f"{r['source']}:{field}")
    groups = Counter((r["benchmark"], r["level"]) for r in rows)
    with_helpers = sum(1 for r in rows if r["helper_images"])
    with_answer = sum(1 for r in rows if r["completion_text"])
    n_images = sum(len(r["images"]) + len(r["helper_images"]) for r in rows)

    table = Table()
    table.add_column("benchmark")
    table.add_column("level", justify="right")
    table.add_column("rows", justify="right")
    for (bench, level), n in sorted(groups.items()):
        table.add_row(bench, str(level), str(n))
    # Plain prints for the lines: paths must not wrap or be read as rich markup.
    print(f"{args.data}: {len(rows)} rows, all valid", flush=True)
    Console().print(table)
    print(f"rows with a completion (text_output): {with_answer}")
    print(f"rows with helper images: {with_helpers}")
    print(f"images checked: {n_images} (all exist)")
    return 0
