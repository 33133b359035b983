"""What every recipe runs, step by step: the pieces `recipes/*.py` call in order (see any of them).

1. `parse_recipe_args` (in `preflight`) reads the YAML and the flags, and `preflight` checks every
   setting, path and backend before anything heavy;
2. `load_train_data` reads the data (the recipe names its benchmark family);
3. `load_for_training` (in `models.load`) loads a base model, or the previous stage's output (a LoRA
   adapter is continued, still trainable);
4. the recipe builds its trainer (`MirageSFTTrainer`, `MirageGRPOTrainer` or the text-only baseline);
5. `train` trains, resuming from the newest complete checkpoint of `output_dir` when there is one
   (as alignment-handbook's scripts do), and saves the metrics and the trainer state;
6. `save_outputs` saves the model or adapter, the processor and the Mirage settings, with TRL's model card;
7. `push_outputs` pushes with TRL's `push_to_hub` when asked.

`run_recipe` runs a recipe's `main()` so that a bad setting is one line and exit code 2.
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import nullcontext
from pathlib import Path

from .card import launch_line
from .checkpoints import check_same_run, newest_complete_checkpoint, own_checkpoints
from .console import end_progress_bars, quiet_console
from .data.sources import load_data
from .errors import MirageError, hub_error, storage_error
from .folders import output_lock
from .io import read_json, write_json
from .models.families import unwrap
from .models.processors import save_processor
from .models.resolve import portable_model_ref
from .models.settings import MirageSettings
from .preflight import parse_recipe_args

logger = logging.getLogger(__name__)


def run_recipe(main_fn, prog: str | None = None):
    """Run a recipe's `main()` the way the `mirage-trl` command runs a subcommand.

    A `MirageError` (bad data, a bad flag, a latent size that disagrees with the checkpoint, a
    non-finite loss) becomes one line `<recipe>: error: ...` on stderr and exit code 2, instead of
    a stack trace. Set `MIRAGE_TRL_DEBUG=1` to see the trace (`--debug` is TrainingArguments' own flag).
    """
    prog = prog or os.path.basename(sys.argv[0]) or "recipe"
    debug = os.environ.get("MIRAGE_TRL_DEBUG", "") not in ("", "0")
    quiet_console()
    try:
        return main_fn()
    except Exception as e:
        # the user's to fix: bad input, a full disk or read-only folder, the Hub out of reach
        error = e if isinstance(e, MirageError) else storage_error(e) or hub_error(e)
        if error is None or debug:
            raise
        end_progress_bars()  # the message starts a line of its own, even mid-bar: the launcher finds it
        print(f"{prog}: error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def launch(main_fn, arg_classes, **fixed):
    """Run a recipe's `main(script_args, training_args, model_args, **fixed)` on the command line's YAML and
    flags (`TrlParser` over `arg_classes`), errors in one line (`run_recipe`). `fixed`: what the recipe script
    names (its stage, its benchmark)."""
    return run_recipe(lambda: main_fn(*parse_recipe_args(arg_classes), **fixed))


def check_stage(training_args, stage: int, recipe: str) -> None:
    """The recipe runs `stage`: a different `--stage` is refused, never overwritten; unset, it is set."""
    given = getattr(training_args, "stage", None)
    if given is not None and given != stage:
        raise MirageError(
            f"--stage {given}: {recipe} runs stage {stage}; use the stage-{given} recipe, or drop --stage"
        )
    training_args.stage = stage


def load_train_data(script_args, benchmark: str | None = None):
    """(train, eval or None) as `datasets.Dataset`s of loaded rows; `--benchmark` wins over the recipe's.

    `--dataset_name` is a reference JSONL, a local dataset folder or a dataset id (`data.sources`), read
    with TRL's `--dataset_config` and `--dataset_train_split`; `--eval_dataset_name` is read the same way
    with `--dataset_test_split`."""
    if not script_args.dataset_name:
        raise MirageError(
            "--dataset_name: give the data to train on (a JSONL file, a dataset folder or a dataset id)"
        )
    name = script_args.benchmark or benchmark
    common = dict(
        config=script_args.dataset_config,
        root=script_args.dataset_root,
        benchmark=name,
        streaming=script_args.dataset_streaming,
    )
    train = load_data(script_args.dataset_name, split=script_args.dataset_train_split, **common)
    if script_args.max_train_samples:
        train = train.select(range(min(script_args.max_train_samples, len(train))))
    evals = None
    if script_args.eval_dataset_name:
        evals = load_data(
            script_args.eval_dataset_name,
            split=script_args.dataset_test_split,
            flag="--eval_dataset_name",
            **common,
        )
    return train, evals


def peft_config_for(model, model_args):
    """TRL's PEFT config from the flags, or None when `model` already is the previous stage's adapter."""
    from peft import PeftModel
    from trl import get_peft_config

    return None if isinstance(model, PeftModel) else get_peft_config(model_args)


def train(trainer, training_args):
    """Train (resuming from `--resume_from_checkpoint`, or else from the newest complete checkpoint in
    `output_dir`), then log and save the train metrics and the trainer state. Returns the metrics."""
    checkpoint = training_args.resume_from_checkpoint
    if checkpoint is None:  # a checkpoint a run wrote (run_args.json), or one of an older version's runs
        own = own_checkpoints(training_args.output_dir)
        checkpoint = own[-1] if own else newest_complete_checkpoint(training_args.output_dir)
        if checkpoint is not None:
            logger.info("checkpoint found in output_dir: resuming training from %s", checkpoint)
    if checkpoint is not None and not isinstance(checkpoint, bool):
        check_same_run(checkpoint, training_args)  # a finished run or changed arguments: refused, one line
    # one run at a time per output folder (the main process holds the lock)
    lock = output_lock(training_args.output_dir) if trainer.accelerator.is_main_process else nullcontext()
    with lock:
        metrics = trainer.train(resume_from_checkpoint=checkpoint).metrics
    metrics["train_samples"] = len(trainer.train_dataset)
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()
    return metrics


def save_outputs(
    trainer, output_dir: str, stage: int | None, base_model: str, datasets: list[str] | None = None
):
    """Save the model or adapter, the processor with the latent tokens, the Mirage settings (with the
    stages run so far) and TRL's model card. A text-only baseline has no Mirage settings (its trainer
    says so) and writes only the rest."""
    trainer.save_model(output_dir)
    if not trainer.accelerator.is_main_process:
        return

    save_processor(trainer.processing_class, output_dir, unwrap(trainer.model).config.model_type)
    settings = trainer.mirage_checkpoint_settings()
    if settings is not None:
        previous = MirageSettings.read(base_model) if Path(base_model).is_dir() else None
        history = list(previous.provenance.get("stages", [])) if previous else []
        # one launch line per stage run, in order (a file of an older version holds one string)
        launches = previous.provenance.get("launch", []) if previous else []
        launches = [launches] if isinstance(launches, str) else list(launches)
        settings = settings.replace(
            stages=history + [stage],
            base_model=portable_model_ref(base_model),
            launch=launches + [launch_line()],
        )
        if datasets:
            settings = settings.replace(datasets=list(datasets))
        # Adapters do not save the base config: the settings travel in their own file as well.
        settings.write(output_dir)
    make_adapter_portable(output_dir)
    trainer.create_model_card(model_name=Path(output_dir).name, dataset_name=(datasets or [None])[0])


def make_adapter_portable(folder) -> None:
    """PEFT records the base as it was given (often a path relative to where training ran): make it absolute."""
    path = Path(folder) / "adapter_config.json"
    if path.is_file():
        config = read_json(path)
        base = config.get("base_model_name_or_path")
        if base and portable_model_ref(base) != base:
            config["base_model_name_or_path"] = portable_model_ref(base)
            write_json(path, config)


def push_outputs(trainer, dataset_name: str | None) -> None:
    """TRL's push_to_hub; a failure keeps the local files and says so."""
    try:
        trainer.push_to_hub(dataset_name=dataset_name)
    except Exception as e:  # network, auth: the local output is complete either way
        raise MirageError(
            f"push to the Hub failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            f"the trained model is saved locally in {trainer.args.output_dir}"
        ) from None
