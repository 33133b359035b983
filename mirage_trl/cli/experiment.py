"""`mirage-trl experiment`: the learning experiment (every arm, ablations, statistics, report, plots)."""

from __future__ import annotations

import shlex
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "experiment",
        help="train every arm (text-only, Mirage, markers-only, upper bound) offline and report what they learned",
    )
    p.add_argument(
        "--config",
        help="experiment YAML, or the name of a shipped one: vsp_planning (the default), vsp_planning_latents "
        "(latent options, three seeds)",
    )
    p.add_argument(
        "--out", default="outputs/experiment", help="output folder (report.md, results.json, plots)"
    )
    p.add_argument("--quick", action="store_true", help="the same pipeline at toy size (under 2 minutes)")
    p.add_argument("--seeds", type=int, nargs="+", help="override the config's seeds")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--jobs",
        type=int,
        help="arms trained side by side, each in its own process with its share of the torch threads "
        "(default: 2 where there are 2 cores or more, else 1)",
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="write report.md and the plots again from --out/results.json (no training)",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    if args.report_only:
        from pathlib import Path

        from ..report import rebuild

        rebuild(Path(args.out))  # a results.json that is not an experiment's: one line naming what is missing
        print(f"wrote {args.out}/report.md and the plots from {args.out}/results.json")
        return 0
    from ..errors import MirageError
    from ..experiment import adopt_legacy_folder, load_config
    from ..folders import check_output_dir

    cfg = load_config(args.config, quick=args.quick)  # a bad config: one line, before anything runs
    if args.jobs is not None and args.jobs < 1:
        raise MirageError(f"--jobs {args.jobs}: must be at least 1")
    if args.seeds:
        if any(type(s) is not int or s < 0 for s in args.seeds):
            raise MirageError(f"--seeds {args.seeds}: seeds are integers >= 0")
        cfg.seeds = list(args.seeds)
    if args.overwrite:
        adopt_legacy_folder(args.out)  # an experiment folder of a version that wrote no marker
    check_output_dir(args.out, args.overwrite)
    from pathlib import Path

    from ..experiment import run_experiment
    from ..folders import atomic_dir, relocate_references

    command = (
        "mirage-trl " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        if sys.argv[1:]
        else "mirage-trl experiment"
    )
    # Written beside --out and swapped in at the end: an interrupted run leaves the old folder as it was.
    with atomic_dir(args.out, overwrite=args.overwrite, command="experiment") as tmp:
        results = run_experiment(cfg, tmp, progress=not args.no_progress, command=command, workers=args.jobs)
        relocate_references(tmp, Path(args.out))  # the models' recorded bases name the final folder
    best = results["summary"]["best_arm_level3"]
    print(f"wrote {args.out}/report.md, results.json and plots ({results['wall_seconds'] / 60:.1f} min)")
    if "accuracy" in best:
        print(f"best arm on level-3 test maps: {best['arm']} {100 * best['accuracy']:.1f} %")
    return 0
