"""`mirage-trl train RECIPE [flags]`: run a recipe script through `accelerate launch`, so that a bad setting is
the last line on screen.

`accelerate launch` re-raises a worker's non-zero exit with a traceback of its own, printed after the
worker's one-line error. This launcher runs accelerate quietly, passes the worker's output through as it
comes, and on failure repeats the worker's error line last and exits 2. `--accelerate_config NAME` takes a
file of `zero_configs/` by name (`ddp`, `zero2`, `zero3`, `zero3_offload`) or a path; every other flag goes
to the recipe (`--config YAML`, `--learning_rate`, ...).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ZERO_CONFIGS = Path(__file__).resolve().parents[2] / "zero_configs"


def register(sub) -> None:
    p = sub.add_parser(
        "train",
        help="run a recipe through accelerate launch, with errors as the last line",
        description=__doc__.split("\n\n")[1],
        allow_abbrev=False,
    )
    p.add_argument("recipe", help="recipe script, e.g. recipes/stage1_vsp.py")
    p.add_argument(
        "--accelerate_config",
        default=None,
        help="zero_configs/ file by name (ddp, zero2, zero3, zero3_offload) or an accelerate config path",
    )
    p.add_argument("--num_processes", type=int, default=None, help="processes to launch (accelerate's flag)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU (accelerate's flag)")
    p.set_defaults(func=run, pass_through=True)


def _accelerate_config(value: str) -> str:
    from ..errors import MirageError

    path = Path(value)
    if not path.is_file():
        path = ZERO_CONFIGS / f"{value}.yaml"
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in ZERO_CONFIGS.glob("*.yaml")))
        raise MirageError(f"--accelerate_config {value}: no such file or name (names: {names})")
    return str(path)


def run(args) -> int:
    from ..errors import MirageError

    recipe = Path(args.recipe)
    if not recipe.is_file():
        raise MirageError(f"{args.recipe}: no such recipe script")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--quiet"]
    if args.accelerate_config:
        cmd += ["--config_file", _accelerate_config(args.accelerate_config)]
    if args.cpu:
        cmd += ["--cpu", "--mixed_precision", "no"]
    cmd += ["--num_processes", str(args.num_processes or 1), "--num_machines", "1", "--dynamo_backend", "no"]
    cmd += [str(recipe), *args.rest]
    error_line = re.compile(rf"^{re.escape(recipe.name)}: error: ")
    last_error = None
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    for line in proc.stderr:
        sys.stderr.write(line)
        if error_line.match(line):
            last_error = line.rstrip("\n")
    proc.wait()
    if proc.returncode == 0:
        return 0
    if last_error:
        # Whatever the launcher printed after it, the worker's message is what the user reads last.
        raise MirageError(last_error.split(": error: ", 1)[1])
    raise MirageError(f"{recipe.name} failed (exit code {proc.returncode}); its output is above")
