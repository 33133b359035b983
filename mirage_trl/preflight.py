"""Checks a recipe runs before any model loads, each a one-line `MirageError` naming the file, the key, the
flag or the path: the YAML (syntax, shape, unknown keys, value types), argparse's own errors, the output
folder, the checkpoint to resume from and the model folder (config, weights, adapter and its base,
Mirage settings). `run_recipe` turns them into `<recipe>: error: ...` and exit 2."""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from pathlib import Path

from .checkpoints import check_resume_checkpoint
from .configs import refuse_peft_under_zero3
from .console import HelpFormatter
from .errors import MirageError
from .folders import check_training_output_dir
from .models.resolve import check_model_source


def _fields(types) -> dict[str, dataclasses.Field]:
    return {f.name: f for t in types for f in dataclasses.fields(t)}


def plain_type(tp):
    """int / float / bool / str for a field annotated with one of them (optionally `| None`), `list[T]` for a
    list of one of them, else None."""
    if isinstance(tp, str):
        tp = {"int": int, "float": float, "bool": bool, "str": str}.get(tp.replace(" | None", "").strip())
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = args[0] if len(args) == 1 else None
    if typing.get_origin(tp) is list:
        (elem,) = typing.get_args(tp) or (None,)
        return list[elem] if elem in (int, float, bool, str) else None
    return tp if tp in (int, float, bool, str) else None


def fits_type(v, expected) -> bool:
    """Whether a YAML value fits a plain type (a bool is no number; an int is a float) or a `list[T]`."""
    if typing.get_origin(expected) is list:
        (elem,) = typing.get_args(expected)
        return isinstance(v, list) and all(isinstance(x, str) or fits_type(x, elem) for x in v)
    if expected is float and isinstance(v, int) and not isinstance(v, bool):
        return True
    return isinstance(v, expected) and not (expected is not bool and isinstance(v, bool))


def check_recipe_yaml(path, types) -> dict:
    """The `--config` YAML: a mapping whose keys are fields of `types` and whose values fit their types."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise MirageError(
            f"--config {path}: no such file" if not path.exists() else f"--config {path}: not a file"
        )
    try:
        value = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise MirageError(f"{path}: not UTF-8 text") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise MirageError(f"{path}{line}: YAML syntax error ({getattr(e, 'problem', None) or e})") from None
    if value is None:
        raise MirageError(f"{path}: the file is empty; expected a mapping of settings (key: value)")
    if not isinstance(value, dict):
        raise MirageError(
            f"{path}: expected a mapping of settings (key: value), got a {type(value).__name__}"
        )
    fields = _fields(types)
    hints = {}
    for t in types:
        try:
            hints.update(typing.get_type_hints(t))
        except Exception:  # unresolvable annotations: fall back to the raw ones
            hints.update({f.name: f.type for f in dataclasses.fields(t)})
    for key, v in value.items():
        if key not in fields:
            owners = ", ".join(t.__name__ for t in types)
            raise MirageError(f"{path}: unknown key {key!r} (not a field of {owners})")
        expected = plain_type(hints.get(key, fields[key].type))
        if expected is None or v is None or isinstance(v, str):
            continue  # strings are converted by the parser, which names the flag when it cannot
        if not fits_type(v, expected):
            what = (
                f"a list of {typing.get_args(expected)[0].__name__}"
                if typing.get_origin(expected) is list
                else expected.__name__
            )
            raise MirageError(f"{path}:{key}: expected {what}, got {type(v).__name__} {v!r}")
    return value


def parse_recipe_args(types, argv: list[str] | None = None):
    """`TrlParser(types).parse_args_and_config()`, with every error one line (see the module doc)."""
    from trl import TrlParser

    argv = list(sys.argv[1:] if argv is None else argv)
    config = None
    for i, arg in enumerate(argv):
        if arg == "--config":
            if i + 1 >= len(argv):
                raise MirageError("--config: give the recipe's YAML file")
            config = argv[i + 1]
        elif arg.startswith("--config="):
            config = arg.split("=", 1)[1]
    if config is not None:
        check_recipe_yaml(config, types)
    parser = TrlParser(types, formatter_class=HelpFormatter)  # each default once in --help

    def error(message):
        raise MirageError(message)

    parser.error = error  # argparse would print its usage and exit; one line instead
    try:
        return parser.parse_args_and_config(args=argv)
    except MirageError:
        raise
    except (ValueError, TypeError) as e:  # a TrainingArguments / TRL config check
        where = config or "arguments"
        raise MirageError(f"{where}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


# `report_to` backend -> the modules transformers' integration imports (any one will do) and how to get one.
REPORT_BACKENDS = {
    "tensorboard": (("tensorboard", "tensorboardX"), "pip install 'mirage-trl[tensorboard]'"),
    "wandb": (("wandb",), "pip install 'mirage-trl[wandb]'"),
    "trackio": (("trackio",), "pip install trackio"),
    "mlflow": (("mlflow",), "pip install mlflow"),
    "comet_ml": (("comet_ml",), "pip install comet_ml"),
    "clearml": (("clearml",), "pip install clearml"),
    "dvclive": (("dvclive",), "pip install dvclive"),
    "swanlab": (("swanlab",), "pip install swanlab"),
    "neptune": (("neptune",), "pip install neptune"),
    "codecarbon": (("codecarbon",), "pip install codecarbon"),
}


def check_report_to(report_to) -> None:
    """Every `--report_to` backend is importable; otherwise one line naming the extra, before the model loads
    (transformers would only fail when the trainer is built, after the weights are in memory)."""
    import importlib.util

    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    for name in names:
        if name in ("none", "all") or name not in REPORT_BACKENDS:
            continue  # "all" is what is installed; an unknown name is transformers' own error
        modules, how = REPORT_BACKENDS[name]
        if not any(importlib.util.find_spec(m) is not None for m in modules):
            raise MirageError(
                f"--report_to {name}: the {modules[0]} package is not installed ({how}, or --report_to none)"
            )


def check_hub_reachable(training_args) -> None:
    """`--push_to_hub` with the Hub switched off (`HF_HUB_OFFLINE`): one line now, not a traceback when the
    trainer creates the repository after the weights are loaded."""
    if not getattr(training_args, "push_to_hub", False):
        return
    import os

    from huggingface_hub import constants

    # the environment as it is now (huggingface_hub read it once, at import)
    offline = any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))  # fmt: skip
    if constants.HF_HUB_OFFLINE or offline:
        raise MirageError(
            "--push_to_hub: the Hub is offline here (HF_HUB_OFFLINE is set); train without --push_to_hub and "
            "push the output later (mirage-trl export --push-to-hub)"
        )


def preflight(script_args, training_args, model_args) -> None:
    """What a recipe checks after parsing and before loading anything heavy."""
    check_report_to(getattr(training_args, "report_to", None))
    inputs = {
        "the model": model_args.model_name_or_path,
        "the data": getattr(script_args, "dataset_name", None),
        "the eval data": getattr(script_args, "eval_dataset_name", None),
    }
    # no user's file is overwritten: a folder of someone else's files is refused, a run of ours is resumed
    check_training_output_dir(training_args.output_dir, inputs)
    check_hub_reachable(training_args)
    check_resume_checkpoint(getattr(training_args, "resume_from_checkpoint", None))
    check_model_source(model_args.model_name_or_path)
    refuse_peft_under_zero3(getattr(model_args, "use_peft", False))
