"""The logic behind the recipes: each `recipes/<stage>_<benchmark>.py` is a few lines that parse
its YAML with `TrlParser` and call one of these."""

from __future__ import annotations

import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def load_train_data(script_args, benchmark: str | None = None):
    from .data.reference import load_reference_jsonl
    from .errors import MirageError

    if not script_args.dataset_name:
        raise MirageError("--dataset_name: give the reference-format JSONL to train on")
    name = script_args.benchmark or benchmark
    train = load_reference_jsonl(script_args.dataset_name, root=script_args.dataset_root, benchmark=name)
    if script_args.max_train_samples:
        train = train.select(range(min(script_args.max_train_samples, len(train))))
    evals = None
    if script_args.eval_dataset_name:
        evals = load_reference_jsonl(
            script_args.eval_dataset_name, root=script_args.dataset_root, benchmark=name
        )
    return train, evals


def run_sft(script_args, training_args, model_args, stage: int, benchmark: str | None = None):
    """Stage 1 or stage 2 of Mirage: load, train, save (adapter or full model + processor), push if asked."""
    from .trainers.sft import MirageSFTTrainer

    training_args.stage = stage
    return train_and_save(MirageSFTTrainer, script_args, training_args, model_args, stage, benchmark)


def train_and_save(
    trainer_cls, script_args, training_args, model_args, stage: int, benchmark: str | None = None
):
    """What every Mirage recipe does: load the data and the model, train, save, push if asked."""
    from peft import PeftModel
    from trl import get_peft_config

    from .models.training import load_for_training
    from .preflight import preflight

    preflight(script_args, training_args, model_args)  # before the data and the model load
    train, evals = load_train_data(script_args, benchmark)
    model, processor = load_for_training(model_args.model_name_or_path, training_args, model_args)
    # A LoRA output of the previous stage is continued as the same adapter, so no new PEFT config then.
    peft_config = None if isinstance(model, PeftModel) else get_peft_config(model_args)
    trainer = trainer_cls(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=evals,
        processing_class=processor,
        peft_config=peft_config,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    save_outputs(
        trainer,
        training_args.output_dir,
        stage=stage,
        base_model=model_args.model_name_or_path,
        datasets=[script_args.dataset_name],
    )
    if training_args.push_to_hub:
        push_outputs(trainer, script_args.dataset_name)
    return trainer


def save_outputs(
    trainer, output_dir: str, stage: int, base_model: str, datasets: list[str] | None = None
) -> None:
    """Save the model or adapter, the processor with the latent tokens, and the Mirage settings."""
    from .io import write_json
    from .latent.model_utils import unwrap
    from .latent.tokens import get_mirage_config
    from .models.load import portable_model_ref

    trainer.save_model(output_dir)
    if trainer.accelerator.is_main_process:
        trainer.processing_class.save_pretrained(output_dir)
        mirage = get_mirage_config(unwrap(trainer.model)) or {}
        history = _stages_run(base_model) + [stage]
        from .export import launch_line

        mirage.update(stages=history, base_model=portable_model_ref(base_model), launch=launch_line())
        if datasets:
            mirage["datasets"] = list(datasets)
        # Adapters do not save the base config: the settings travel in their own file as well.
        write_json(Path(output_dir) / "mirage_config.json", mirage)
        make_adapter_portable(output_dir)


def make_adapter_portable(folder) -> None:
    """PEFT records the base as it was given (often a path relative to where training ran): make it absolute."""
    from .io import write_json
    from .models.load import _read_json, portable_model_ref

    path = Path(folder) / "adapter_config.json"
    if path.is_file():
        config = _read_json(path)
        base = config.get("base_model_name_or_path")
        if base and portable_model_ref(base) != base:
            config["base_model_name_or_path"] = portable_model_ref(base)
            write_json(path, config)


def _stages_run(base_model: str) -> list[int]:
    path = Path(base_model) / "mirage_config.json"
    if path.is_file():
        return list(json.loads(path.read_text()).get("stages", []))
    return []


def push_outputs(trainer, dataset_name: str | None) -> None:
    """TRL's push_to_hub; a failure keeps the local files and says so."""
    from .errors import MirageError

    try:
        trainer.push_to_hub(dataset_name=dataset_name)
    except Exception as e:  # network, auth: the local output is complete either way
        raise MirageError(
            f"push to the Hub failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            f"the trained model is saved locally in {trainer.args.output_dir}"
        ) from None
