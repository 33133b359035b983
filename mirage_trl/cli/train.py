"""`mirage-trl train METHOD --benchmark NAME --config YAML [flags]` (or `mirage-trl train RECIPE.py ...`): run a
recipe through `accelerate launch`, as `trl sft --config ...` runs TRL's, with a bad setting the last line on screen.

METHOD is stage1, stage2, grpo or text_sft (the text-only baseline; `sft` is accepted for it), run on the shipped recipe of `--benchmark`
(`shipped.RECIPE_BENCHMARKS`); `--config` takes a YAML path, a shipped YAML by name
(`Qwen2.5-VL-7B-Instruct/stage1/config_vsp_lora`) or by its variant for that method and benchmark
(`lora`, `full`, `smoke`, `demo`). The shipped recipes and YAMLs travel in the wheel, so this works
from `pip install mirage-trl` alone.

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

from ..errors import MirageError
from ..shipped import METHOD_ALIASES, METHODS, RECIPE_BENCHMARKS, recipe_config, recipe_script, shipped


def register(sub) -> None:
    p = sub.add_parser(
        "train",
        help="run a recipe through accelerate launch, with errors as the last line",
        description=__doc__.split("\n\n")[1],
        allow_abbrev=False,
    )
    p.add_argument(
        "recipe",
        metavar="METHOD_OR_RECIPE",
        help=f"{', '.join(METHODS)} (with --benchmark), or a recipe script such as recipes/stage1_vsp.py",
    )
    p.add_argument(
        "--benchmark",
        default=None,
        help=f"with a METHOD: the benchmark whose recipe runs ({', '.join(RECIPE_BENCHMARKS)}); passed on as the "
        "recipe's --benchmark when it is a full benchmark name (vsp_reasoning)",
    )
    p.add_argument(
        "--config",
        default=None,
        help="the recipe's YAML: a path, a shipped YAML by name, or its variant (lora, full, smoke, demo)",
    )
    p.add_argument(
        "--accelerate_config",
        default=None,
        help="zero_configs/ file by name (ddp, zero2, zero3, zero3_offload) or an accelerate config path",
    )
    p.add_argument("--num_processes", type=int, default=None, help="processes to launch (accelerate's flag)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU (accelerate's flag)")
    p.set_defaults(func=run, pass_through=True)


def _accelerate_config(value: str) -> str:
    path = Path(value)
    if not path.is_file():
        path = shipped("zero_configs") / f"{value}.yaml"
    if not path.is_file():
        raise MirageError(f"--accelerate_config {value}: no such file or name (names: {names_of_shipped()})")
    # read as accelerate will read it, so a file that is not an accelerate config is one line here
    from accelerate.commands.config.config_args import load_config_from_file

    try:
        load_config_from_file(str(path))
    except Exception as e:  # YAML/JSON syntax, not a mapping, keys accelerate does not know
        reason = (str(e).splitlines() or [""])[0] or type(e).__name__
        raise MirageError(
            f"--accelerate_config {value}: not an accelerate config ({type(e).__name__}: {reason}); make one "
            f"with `accelerate config --config_file FILE`, or name a shipped one ({names_of_shipped()})"
        ) from None
    return str(path)


def threads_per_process(processes: int) -> int:
    """Torch threads for each of `processes` CPU processes: the physical cores shared out, at least 1."""
    import psutil

    return max(1, (psutil.cpu_count(logical=False) or 1) // max(1, processes))


def names_of_shipped() -> str:
    return ", ".join(sorted(p.stem for p in shipped("zero_configs").glob("*.yaml")))


def _recipe(args):
    """(script, method or None, recipe benchmark or None, flags for the recipe) from METHOD_OR_RECIPE."""
    if args.recipe in METHOD_ALIASES:
        print(
            f"note: `mirage-trl train {args.recipe}` is now `mirage-trl train {METHOD_ALIASES[args.recipe]}` "
            "(the text-only baseline); the old name stays accepted",
            file=sys.stderr,
        )
        args.recipe = METHOD_ALIASES[args.recipe]
    if args.recipe not in METHODS:
        recipe = Path(args.recipe)
        if not recipe.is_file():
            raise MirageError(f"{args.recipe}: no such recipe script, nor a method ({', '.join(METHODS)})")
        return recipe, None, None, ([] if args.benchmark is None else ["--benchmark", args.benchmark])
    if args.benchmark is None:
        raise MirageError(
            f"{args.recipe}: give --benchmark ({', '.join(RECIPE_BENCHMARKS)}) to pick its recipe"
        )
    # vsp_reasoning runs the vsp recipe with --benchmark vsp_reasoning; vsp picks the recipe only
    family = args.benchmark.split("_", 1)[0]
    extra = [] if args.benchmark == family else ["--benchmark", args.benchmark]
    return recipe_script(args.recipe, family), args.recipe, family, extra


def run(args) -> int:
    recipe, method, family, extra = _recipe(args)
    if args.config is not None:
        extra += ["--config", recipe_config(args.config, method, family)]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--quiet"]
    if args.accelerate_config:
        cmd += ["--config_file", _accelerate_config(args.accelerate_config)]
    if args.cpu:
        cmd += ["--cpu", "--mixed_precision", "no"]
    cmd += ["--num_processes", str(args.num_processes or 1), "--num_machines", "1", "--dynamo_backend", "no"]
    if args.cpu and not os.environ.get("OMP_NUM_THREADS"):  # what accelerate would pick, without its warning
        cmd += ["--num_cpu_threads_per_process", str(threads_per_process(args.num_processes or 1))]
    cmd += [str(recipe), *extra, *args.rest]
    # anywhere in a line: a message printed while a progress bar held the line is glued after the bar
    error_line = re.compile(rf"{re.escape(recipe.name)}: error: (.*)$")
    last_error = None
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    for line in proc.stderr:
        sys.stderr.write(line)
        found = error_line.search(line.rstrip("\n"))
        if found:
            last_error = found.group(1)
    proc.wait()
    if proc.returncode == 0:
        return 0
    if last_error:
        # Whatever the launcher printed after it, the worker's message is what the user reads last.
        raise MirageError(last_error)
    raise MirageError(f"{recipe.name} failed (exit code {proc.returncode}); its output is above")
