"""`mirage-trl data ...`: generate and check benchmark data in the reference JSONL format.

Each data subcommand lives in `mirage_trl/cli/data_<name>.py` with `register(subparsers)`.
"""

from __future__ import annotations

import importlib

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
