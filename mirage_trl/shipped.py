"""Files mirage-trl ships beside its code: the recipes with their YAMLs, the accelerate/DeepSpeed configs and
the 7B model config.

In an installed wheel they are package data (`mirage_trl/recipes`, `mirage_trl/zero_configs`,
`mirage_trl/model_configs`); in a clone (and an editable install) they are the repository's `recipes/`,
`zero_configs/` and `bench/configs/`. `shipped(kind)` is the one place that knows both layouts.
"""

from __future__ import annotations

from pathlib import Path

from .errors import MirageError
from .grading import BENCHMARKS

# kind -> the folder in a clone (the wheel's folder is mirage_trl/<kind>)
KINDS = {"recipes": "recipes", "zero_configs": "zero_configs", "model_configs": "bench/configs"}
METHODS = ("stage1", "stage2", "grpo", "text_sft")  # the recipes' <method>_<benchmark>.py and YAML folders
# Older names still accepted: `sft` was the text-only baseline's name beside the Mirage SFT stages 1 and 2.
METHOD_ALIASES = {"sft": "text_sft"}
# One recipe per benchmark family: the VSP tasks (vsp_planning, vsp_reasoning, ...) share recipes/<method>_vsp.py.
RECIPE_BENCHMARKS = tuple(dict.fromkeys(b.split("_", 1)[0] for b in BENCHMARKS))
DEFAULT_MODEL = "Qwen2.5-VL-7B-Instruct"  # the paper's model: what a YAML variant alone names


def shipped(kind: str) -> Path:
    """The folder of shipped files of `kind` (one of `KINDS`)."""
    package = Path(__file__).resolve().parent
    for folder in (package / kind, package.parent / KINDS[kind]):
        if folder.is_dir():
            return folder
    raise MirageError(f"this installation of mirage-trl has no {kind} folder (reinstall mirage-trl)")


def recipe_script(method: str, benchmark: str) -> Path:
    """`recipes/<method>_<benchmark>.py`."""
    if method not in METHODS:
        raise MirageError(f"unknown method {method!r}; valid: {', '.join(METHODS)} (or a recipe script path)")
    if benchmark not in RECIPE_BENCHMARKS:
        raise MirageError(
            f"--benchmark {benchmark}: no {method} recipe for it; valid: {', '.join(RECIPE_BENCHMARKS)}"
        )
    return shipped("recipes") / f"{method}_{benchmark}.py"


def recipe_configs(method: str | None = None, benchmark: str | None = None) -> list[str]:
    """Names of the shipped YAMLs (`<Model>/<method>/config_<benchmark>_<variant>`), optionally for one method
    and benchmark."""
    root = shipped("recipes")
    names = sorted(str(p.relative_to(root).with_suffix("")) for p in root.glob("*/*/config_*.yaml"))
    if method is not None:
        names = [n for n in names if n.split("/")[1] == method]
    if benchmark is not None:
        names = [n for n in names if n.split("/")[2].startswith(f"config_{benchmark}_")]
    return names


def recipe_config(value: str, method: str | None = None, benchmark: str | None = None) -> str:
    """A `--config` value as a file: a path as it is, else a shipped YAML by its name
    (`Qwen2.5-VL-7B-Instruct/stage1/config_vsp_lora`, `gemma-3-4b-it/stage1/config_vsp_lora`) or, given the
    method and benchmark, by its variant (`lora`, `full`, `smoke`, `demo`): the paper model's
    (`DEFAULT_MODEL`) where several model folders have it."""
    if Path(value).is_file():
        return value
    root = shipped("recipes")
    name = value[: -len(".yaml")] if value.endswith(".yaml") else value
    if (root / f"{name}.yaml").is_file():
        return str(root / f"{name}.yaml")
    candidates = recipe_configs(method, benchmark)
    matches = [n for n in candidates if n.endswith(f"_{name}")]
    if len(matches) > 1:  # a variant alone names the paper model's YAML; other models' by their folder
        matches = [n for n in matches if n.startswith(f"{DEFAULT_MODEL}/")] or matches
    if len(matches) == 1:
        return str(root / f"{matches[0]}.yaml")
    if len(matches) > 1:
        raise MirageError(
            f"--config {value}: several shipped YAMLs have that variant ({', '.join(matches)}); name one"
        )
    raise MirageError(
        f"--config {value}: no such file or shipped YAML (shipped: {', '.join(candidates) or 'none'})"
    )
