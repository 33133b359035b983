"""The baselines beside every Mirage number (docs/method.md section 5): TRL's `SFTTrainer` on text-only rows.

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

from pathlib import Path

from trl import SFTTrainer

from ..data.images import load_image
from ..data.reference import helper_as_input as _helper_as_input
from ..data.reference import strip_latent_markers
from ..errors import MirageError
from ..io import write_json
from ..models.resolve import portable_model_ref
from .common import MirageTrainerMixin, restrict_to_language_model


def to_sft_row(row: dict, helper_as_input: bool = False) -> dict:
    """A loaded reference row -> TRL prompt-completion row (`images` still paths)."""
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
    batch = dict(batch)
    batch["images"] = [[load_image(p, source="images") for p in paths] for paths in batch["images"]]
    return batch


def build_sft_dataset(dataset, helper_as_input: bool = False):
    """`datasets.Dataset` of loaded rows -> prompt/completion/images dataset with images decoded lazily."""
    rows = [to_sft_row(dataset[i], helper_as_input) for i in range(len(dataset))]
    from datasets import Dataset

    return Dataset.from_list(rows).with_transform(_decode_images)


class TextSFTTrainer(MirageTrainerMixin, SFTTrainer):
    """TRL's `SFTTrainer` with what every mirage-trl trainer adds around the loop (see `MirageTrainerMixin`):
    no credential in saved files, whole-or-absent checkpoints, no step on a non-finite gradient."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_mirage_trainer()

    def mirage_checkpoint_settings(self):
        return None  # not a Mirage model


def write_baseline_config(output_dir, helper_as_input: bool, data: str, base_model: str) -> None:
    """What a baseline output is, in place of the Mirage settings (`baseline_config.json`)."""
    write_json(
        Path(output_dir) / "baseline_config.json",
        {
            "baseline": "helper_as_input" if helper_as_input else "text_only_sft",
            "data": data,
            "base_model": portable_model_ref(base_model),
        },
    )


def baseline_peft_config(model_args):
    """TRL's PEFT config from the flags, its LoRA targets restricted to the language model (as for Mirage)."""
    from trl import get_peft_config

    return restrict_to_language_model(get_peft_config(model_args))
