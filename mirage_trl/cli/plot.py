"""`mirage-trl plot`: the training curves of a run (every number in its trainer_state.json's log history).

Writes OUTPUT_DIR/training_curves.png (or --out), one panel per logged number: loss, learning rate,
gradient norm, TRL's token accuracy and entropy, the `latent/...` health metrics, validation accuracy.
"""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "plot",
        help="draw a training run's curves from its trainer_state.json",
        description=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("output_dir", help="a training output folder (or one of its checkpoint-N folders)")
    p.add_argument("--out", default=None, help="PNG to write (default: OUTPUT_DIR/training_curves.png)")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from ..curves import find_state, plot_curves, read_curves
    from ..folders import check_output_file
    from ..io import atomic_file

    state = find_state(args.output_dir)
    out = Path(args.out) if args.out else Path(args.output_dir) / "training_curves.png"
    check_output_file(out, "--out", inputs={"the run's trainer_state.json": state})  # before drawing
    curves = read_curves(state)
    with atomic_file(out, mode="wb", encoding=None) as f:  # a good plot is never half-replaced
        names = plot_curves(curves, f, title=str(Path(args.output_dir).resolve().name))
    print(f"{len(names)} curves from {state} drawn in {out}")
    return 0
