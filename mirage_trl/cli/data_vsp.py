"""`mirage-trl data vsp`: generate VSP (FrozenLake) planning, reasoning or grounding data in the reference format.

    mirage-trl data vsp --task planning --levels 3 4 5 6 --num-samples 3000 --split train \\
        --style cot --seed 0 --out data/vsp_planning \\
        --exclude $MIRAGE_DATA/vsp_spatial_planning/test_direct.jsonl
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict

from ..data.vsp import TASKS
from .data import add_format_arguments, publish, rows_folder


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "vsp",
        help="generate VSP (FrozenLake) spatial planning / reasoning / grounding data",
        description="Generate VSP rows (reference JSONL format) and their images; image paths are "
        "relative to --out, which is the dataset root.",
    )
    parser.add_argument(
        "--task",
        required=True,
        choices=list(TASKS),
        help="planning / reasoning: the paper's tasks; grounding: describe the map (a warm-up that teaches a "
        "small model to read maps)",
    )
    parser.add_argument(
        "--levels", type=int, nargs="+", default=[3, 4, 5, 6], help="grid sides (default: 3 4 5 6)"
    )
    parser.add_argument(
        "--num-samples", type=int, required=True, help="rows in all, spread evenly over the levels"
    )
    parser.add_argument(
        "--split", default="train", choices=["train", "test"], help="test rows have no answers text/images"
    )
    parser.add_argument(
        "--style", default="cot", choices=["direct", "cot"], help="answer style (default: cot)"
    )
    parser.add_argument("--seed", type=int, default=0, help="same arguments and seed: byte-identical output")
    parser.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    parser.add_argument(
        "--exclude",
        nargs="+",
        default=[],
        metavar="FILE",
        help="JSONL files whose maps must not be generated",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument(
        "--tile-px",
        type=int,
        help="pixels per tile (default: the official 64); 28 = one vision token per tile on Qwen-VL",
    )
    parser.add_argument(
        "--max-hole-frac",
        type=float,
        default=0.2,
        help="at most this share of a map's squares are holes (default: 0.2, the paper's maps); grounding "
        "warm-ups may use more, so that more different maps exist",
    )
    add_format_arguments(parser)
    parser.set_defaults(func=run)


def summarize(rows, task: str) -> dict:
    """Per level: rows, answer counts (reasoning outcomes, planning plan lengths, grounding holes), hole fraction."""
    per_level = defaultdict(lambda: {"rows": 0, "answers": Counter(), "holes": 0.0})
    for row in rows:
        stats = per_level[row["level"]]
        side = len(row["map_desc"])
        stats["rows"] += 1
        holes = sum(v == -1 for r in row["map_desc"] for v in r)
        stats["answers"][{"reasoning": row["answer"], "planning": len(row["answer"])}.get(task, holes)] += 1
        stats["holes"] += holes / (side * side)
    return {level: s | {"holes": s["holes"] / s["rows"]} for level, s in sorted(per_level.items())}


def run(args) -> int:
    from pathlib import Path

    from ..data.vsp import generate_vsp

    settings = {
        k: getattr(args, k)
        for k in ("task", "levels", "num_samples", "split", "style", "seed", "tile_px", "max_hole_frac")
    }
    with rows_folder(args, inputs={"--exclude": list(args.exclude)}) as (out_dir, overwrite):
        path = generate_vsp(**settings, out_dir=out_dir, exclude=args.exclude, overwrite=overwrite)
        _print_summary(args, path)
        title = (
            f"VSP spatial {args.task} ({args.split}, {args.style}, levels {', '.join(map(str, args.levels))})"
        )
        settings["exclude"] = [Path(e).name for e in args.exclude]  # names only: no local path goes public
        publish(args, path, args.split, title, settings, "data vsp")
    return 0


def _print_summary(args, path) -> None:
    from rich.console import Console
    from rich.table import Table

    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    stats = summarize(rows, args.task)
    reasoning = args.task == "reasoning"
    console = Console()
    if args.format == "jsonl":  # a dataset folder says where it is once written
        console.print(f"wrote {len(rows)} rows to {path} (images under {path.parent / 'images'})")
    table = Table(title=f"VSP {args.task}, {args.split}, {args.style}")
    table.add_column("level", justify="right")
    table.add_column("rows", justify="right")
    table.add_column(
        {"reasoning": "A / B / C", "planning": "plan lengths"}.get(args.task, "holes per map"),
        justify="right",
    )
    table.add_column("hole fraction", justify="right")
    for level, s in stats.items():
        if reasoning:
            answers = " / ".join(str(s["answers"][k]) for k in "ABC")
        else:
            answers = f"{min(s['answers'])}-{max(s['answers'])} (mean {sum(k * n for k, n in s['answers'].items()) / s['rows']:.1f})"
        table.add_row(str(level), str(s["rows"]), answers, f"{s['holes']:.3f}")
    if reasoning:
        total = Counter(row["answer"] for row in rows)
        table.add_row("all", str(len(rows)), " / ".join(str(total[k]) for k in "ABC"), "", style="bold")
    console.print(table)
