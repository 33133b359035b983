"""Baselines beside every Mirage number (docs/method.md section 5), trained with plain TRL `SFTTrainer`.

* text-only SFT: the same rows with the `<output_image>` markers and helper images removed
  (`strip_latent_markers`); direct or CoT follows the data file (`planning_train_direct.jsonl` vs
  `planning_train_cot.jsonl`);
* upper bound (`--helper_as_input true`): the helper images become real input images, appended to the
  user turn (`helper_as_input`), markers removed.

Rows are turned into TRL's conversational prompt-completion form (`prompt`, `completion`, `images`),
so the loss covers the completion only, and the image paths are decoded to PIL images on the fly
(`Dataset.with_transform`), which is what TRL's vision-language collator expects. The vision tower
stays frozen and LoRA "all-linear" means the language model's linear layers, as for Mirage.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from .configs import MirageScriptArguments
from .errors import MirageError

logger = logging.getLogger(__name__)


@dataclass
class BaselineScriptArguments(MirageScriptArguments):
    helper_as_input: bool = field(
        default=False,
        metadata={"help": "upper bound: give the helper images as real input images (markers removed)"},
    )
    # A pretrained tower already encodes where things are; a randomly initialised one does not (its features
    # of two tiles of one kind are the same wherever they are), so a small model trained from scratch can
    # only learn to read a map if the tower learns too: the grounding warm-up's switch.
    train_vision_tower: bool = field(
        default=False,
        metadata={
            "help": "also train the vision tower (default: frozen, as for Mirage); for a grounding warm-up of a "
            "model trained from scratch (docs/experiments.md)"
        },
    )


def to_sft_row(row: dict, helper_as_input: bool = False) -> dict:
    """A loaded reference row -> TRL prompt-completion row (`images` still paths)."""
    from .data.reference import helper_as_input as _helper_as_input
    from .data.reference import strip_latent_markers

    source = row.get("source", "<row>")
    if not any(m["role"] == "assistant" for m in row["messages"]) or not row.get("completion_text"):
        raise MirageError(f"{source}:text_output: a training row needs text_output (the answer to learn)")
    if helper_as_input and not row.get("helper_images"):
        raise MirageError(f"{source}:image_output: --helper_as_input needs helper images in every row")
    row = _helper_as_input(row) if helper_as_input else strip_latent_markers(row)
    return {
        "prompt": [m for m in row["messages"] if m["role"] != "assistant"],
        "completion": [m for m in row["messages"] if m["role"] == "assistant"],
        "images": list(row["images"]),
    }


def _decode_images(batch: dict) -> dict:
    from .data.images import load_image

    batch = dict(batch)
    batch["images"] = [[load_image(p, source="images") for p in paths] for paths in batch["images"]]
    return batch


def build_sft_dataset(dataset, helper_as_input: bool = False):
    """`datasets.Dataset` of loaded rows -> prompt/completion/images dataset with images decoded lazily."""
    rows = [to_sft_row(dataset[i], helper_as_input) for i in range(len(dataset))]
    from datasets import Dataset

    return Dataset.from_list(rows).with_transform(_decode_images)


def text_sft_trainer_class():
    """TRL's `SFTTrainer` with what every mirage-trl trainer adds around the loop (see `MirageTrainerMixin`):
    no credential in saved files, whole-or-absent checkpoints, no step on a non-finite gradient."""
    from trl import SFTTrainer

    from .trainers.common import MirageTrainerMixin

    class TextSFTTrainer(MirageTrainerMixin, SFTTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._init_mirage_trainer()

        def mirage_checkpoint_settings(self):
            return None  # not a Mirage model

    return TextSFTTrainer


def run_text_sft(script_args, training_args, model_args, benchmark: str | None = None):
    """Text-only SFT baseline (or the helper-as-input upper bound): load, train with TRL's SFTTrainer, save."""
    from pathlib import Path

    from trl import get_peft_config

    from .io import write_json
    from .latent.model_utils import vision_tower
    from .models.load import portable_model_ref
    from .models.training import load_for_training
    from .preflight import preflight
    from .scripts import load_train_data, make_adapter_portable
    from .trainers.common import restrict_to_language_model

    preflight(script_args, training_args, model_args)
    helper = bool(getattr(script_args, "helper_as_input", False))
    train, evals = load_train_data(script_args, benchmark)
    train = build_sft_dataset(train, helper)
    if evals is not None:
        evals = build_sft_dataset(evals, helper)
    model, processor = load_for_training(model_args.model_name_or_path, training_args, model_args)
    vision_tower(model).requires_grad_(bool(getattr(script_args, "train_vision_tower", False)))
    trainer = text_sft_trainer_class()(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=evals,
        processing_class=processor,
        peft_config=restrict_to_language_model(get_peft_config(model_args)),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    if trainer.accelerator.is_main_process:
        processor.save_pretrained(training_args.output_dir)
        write_json(
            Path(training_args.output_dir) / "baseline_config.json",
            {
                "baseline": "helper_as_input" if helper else "text_only_sft",
                "data": script_args.dataset_name,
                "base_model": portable_model_ref(model_args.model_name_or_path),
            },
        )
        make_adapter_portable(training_args.output_dir)
    if training_args.push_to_hub:
        from .scripts import push_outputs

        push_outputs(trainer, script_args.dataset_name)
    return trainer
