"""`mirage-trl data ...`: generate and check benchmark data in the reference JSONL format.

Each data subcommand lives in `mirage_trl/cli/data_<name>.py` with `register(subparsers)`.
"""

from __future__ import annotations

import contextlib
import importlib
import tempfile
from pathlib import Path

DATA_SUBCOMMANDS = ["vsp", "jigsaw", "check"]


def register(subparsers) -> None:
    parser = subparsers.add_parser("data", help="generate or check benchmark data (reference JSONL format)")
    sub = parser.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    for name in DATA_SUBCOMMANDS:
        try:
            module = importlib.import_module(f".data_{name}", __package__)
        except ModuleNotFoundError as e:
            if e.name and e.name.endswith(f"data_{name}"):
                continue
            raise
        module.register(sub)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)


# ------------------------------------------------------------------------- --format dataset, --push-to-hub
def add_format_arguments(p) -> None:
    """How generated rows are written: reference JSONL + PNG files, or a Hub dataset folder (and its upload)."""
    p.add_argument(
        "--format",
        choices=["jsonl", "dataset"],
        default="jsonl",
        help="jsonl: reference-format JSONL and PNG files (the default); dataset: a Hub dataset folder (parquet "
        "with the images inside, a dataset card), which loads with datasets.load_dataset and --dataset_name",
    )
    p.add_argument(
        "--push-to-hub",
        metavar="REPO",
        default=None,
        help="with --format dataset: upload it to this dataset repo",
    )
    p.add_argument("--private", action="store_true", help="with --push-to-hub: make the repo private")


@contextlib.contextmanager
def rows_folder(args, inputs: dict):
    """Where the generator writes its JSONL: `--out` itself, or, for `--format dataset`, a temporary folder
    (`--out` checked first, before any work, then written whole by `publish`)."""
    from ..errors import MirageError
    from ..folders import check_output_dir

    if args.push_to_hub and args.format != "dataset":
        raise MirageError(
            "--push-to-hub: only with --format dataset (a JSONL and its PNGs are not a Hub dataset)"
        )
    if args.private and not args.push_to_hub:
        raise MirageError("--private: only with --push-to-hub REPO")
    if args.format == "jsonl":
        yield args.out, args.overwrite
        return
    check_output_dir(args.out, args.overwrite, inputs=inputs)
    with tempfile.TemporaryDirectory(prefix="mirage-trl-rows-") as tmp:
        yield Path(tmp) / "rows", False


def publish(
    args, jsonl, split: str, title: str, settings: dict, command: str, benchmark: str | None = None
) -> None:
    """For `--format dataset`: the Hub dataset folder at `--out` (written whole), then the upload if asked."""
    if args.format != "dataset":
        return
    from ..card import launch_line
    from ..data.hub_dataset import write_hub_dataset
    from ..folders import atomic_dir

    # the command as the card records it: folders by their names only, no local path goes public
    argv, folder_flag = [], False
    for arg in map(str, args.argv):
        if arg.startswith("--"):
            folder_flag = arg in ("--out", "--exclude", "--images")
            argv.append(arg)
        else:
            argv.append(Path(arg).name if folder_flag else arg)
    with atomic_dir(args.out, overwrite=args.overwrite, command=command) as tmp:
        write_hub_dataset(jsonl, tmp, split, title, settings, launch_line(["mirage-trl", *argv]), benchmark)
    print(f"wrote the dataset folder {args.out} (split {split}: {Path(args.out) / 'data'}, card: README.md)")
    if args.push_to_hub:
        from ..hub import push_folder

        url = push_folder(args.out, args.push_to_hub, repo_type="dataset", private=args.private)
        print(f"pushed {args.out} to the dataset repo {args.push_to_hub}: {url}")
