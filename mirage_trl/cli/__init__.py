"""The `mirage-trl` command.

Each subcommand lives in its own module under `mirage_trl/cli/` and exposes
`register(subparsers)` (builds its argparse parser and sets `func`) and keeps heavy
imports (torch, transformers, trl, peft) inside the function it runs, so that
`mirage-trl --help` answers in well under a second.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ..console import HelpFormatter, quiet_console
from ..errors import MirageError, storage_error

# Subcommand modules, in the order `--help` lists them.
SUBCOMMANDS = [
    "data",
    "tiny_model",
    "train",
    "eval",
    "experiment",
    "analyze_latents",
    "plot",
    "export",
    "card",
    "env",
]


class _Parser(argparse.ArgumentParser):
    """Every subcommand's `--help` shows each option's default once (`console.HelpFormatter`), and every `--dashed-option`
    is also accepted as `--dashed_option`: the recipes take TRL's underscore flags, so both styles work
    everywhere (as TRL's own parser does)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def add_argument(self, *names, **kwargs):
        aliases = [n[:2] + n[2:].replace("-", "_") for n in names if n.startswith("--") and "-" in n[2:]]
        return super().add_argument(*names, *[a for a in aliases if a not in names], **kwargs)


def add_data_arguments(p, what: str, split: str = "test") -> None:
    """`--data` and how to read it (`data.sources.load_data`), the same for every subcommand that reads rows."""
    p.add_argument(
        "--data",
        required=True,
        help=f"{what}: a reference-format JSONL, a local dataset folder or a dataset id (reference or TRL "
        "conversational schema)",
    )
    p.add_argument(
        "--data-split", default=split, help="split of a dataset folder or id (ignored for a JSONL)"
    )
    p.add_argument("--data-config", default=None, help="configuration of a dataset id (datasets' name=)")
    p.add_argument(
        "--root",
        default=None,
        help="folder the image paths are relative to (default: the reference layout for a JSONL, the "
        "dataset's folder otherwise)",
    )


def load_data_arguments(args):
    """The rows `add_data_arguments`' flags name, as a `datasets.Dataset`."""
    from ..data.sources import load_data

    return load_data(
        args.data,
        split=args.data_split,
        config=args.data_config,
        root=args.root,
        benchmark=args.benchmark,
        flag="--data",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="mirage-trl",
        description="Mirage latent visual reasoning on top of TRL: data, evaluation, export.",
    )
    from .. import __version__

    parser.add_argument("--debug", action="store_true", help="show the full stack trace on errors")
    parser.add_argument("--version", action="version", version=f"mirage-trl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in SUBCOMMANDS:
        importlib.import_module(f".{name}", __name__).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "pass_through", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what a card records as the command
    quiet_console()
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
    except MirageError as e:
        if args.debug:
            raise
        print(f"mirage-trl {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mirage-trl {args.command}: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # a full disk, a quota, a read-only folder: the user's to fix, one line
        error = storage_error(e)
        if error is None or args.debug:
            raise
        print(f"mirage-trl {args.command}: error: {error}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
