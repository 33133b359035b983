"""Baselines: text-only SFT rows (markers and helper images gone), helper-as-input rows, one TRL SFTTrainer step."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import recipe_main
from PIL import Image

from mirage_trl.configs import BaselineScriptArguments
from mirage_trl.data.reference import load_reference_jsonl
from mirage_trl.errors import MirageError
from mirage_trl.trainers.text_sft import build_sft_dataset, to_sft_row


@pytest.fixture
def train_jsonl(tmp_path):
    for name, seed in (("in.png", 0), ("help1.png", 1), ("help2.png", 2)):
        Image.fromarray((np.random.RandomState(seed).rand(56, 56, 3) * 255).astype("uint8")).save(
            tmp_path / name
        )
    row = {
        "text_input": "<image>Find the path.",
        "image_input": "in.png",
        "text_output": "step one <output_image> step two <output_image> \\boxed{R}",
        "image_output": ["help1.png", "help2.png"],
        "map_desc": [[1, 2]],
    }
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(row) for _ in range(2)) + "\n")
    return path


def test_text_only_and_helper_as_input_rows(train_jsonl):
    ds = load_reference_jsonl(train_jsonl, root=train_jsonl.parent, benchmark="vsp_planning")
    text = to_sft_row(ds[0])
    assert text["completion"][0]["content"][0]["text"] == "step one  step two  \\boxed{R}"
    assert len(text["images"]) == 1 and text["images"][0].endswith("in.png")
    assert sum(c["type"] == "image" for c in text["prompt"][0]["content"]) == 1

    upper = to_sft_row(ds[0], helper_as_input=True)
    assert [p.rsplit("/", 1)[1] for p in upper["images"]] == ["in.png", "help1.png", "help2.png"]
    assert sum(c["type"] == "image" for c in upper["prompt"][0]["content"]) == 3
    assert "<output_image>" not in upper["completion"][0]["content"][0]["text"]

    lazy = build_sft_dataset(ds, helper_as_input=True)
    assert len(lazy) == 2 and all(isinstance(im, Image.Image) for im in lazy[0]["images"])
    with pytest.raises(MirageError, match="text_output"):
        to_sft_row({**ds[0], "messages": ds[0]["messages"][:1], "completion_text": ""})


def test_one_sft_step_on_tiny_model(train_jsonl, tmp_path):
    from trl import ModelConfig, SFTConfig

    from mirage_trl.models.tiny import save_tiny_model

    model_dir = save_tiny_model(tmp_path / "tiny")
    script = BaselineScriptArguments(dataset_name=str(train_jsonl), dataset_root=str(train_jsonl.parent))
    script.helper_as_input = True
    args = SFTConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=1,
        per_device_train_batch_size=2,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        learning_rate=1e-3,
        max_length=None,
        logging_steps=1,
        dataloader_num_workers=0,
    )
    trainer = recipe_main("text_sft_vsp")(script, args, ModelConfig(model_name_or_path=str(model_dir)))
    assert trainer.state.global_step == 1
    assert np.isfinite(trainer.state.log_history[0]["loss"])
    saved = json.loads((tmp_path / "out" / "baseline_config.json").read_text())
    assert saved["baseline"] == "helper_as_input"
    assert (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.parametrize("train_tower", [False, True])
def test_vision_tower_trains_only_when_asked(train_jsonl, tmp_path, train_tower):
    from safetensors.torch import load_file
    from trl import ModelConfig, SFTConfig

    from mirage_trl.models.tiny import save_tiny_model

    model_dir = save_tiny_model(tmp_path / "tiny")
    script = BaselineScriptArguments(
        dataset_name=str(train_jsonl), dataset_root=str(train_jsonl.parent), train_vision_tower=train_tower
    )
    args = SFTConfig(
        output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=2, use_cpu=True,
        report_to="none", save_strategy="no", learning_rate=1e-2, max_length=None, dataloader_num_workers=0,
        bf16=False, gradient_checkpointing=False,
    )  # fmt: skip
    recipe_main("text_sft_vsp")(script, args, ModelConfig(model_name_or_path=str(model_dir)))
    before = load_file(model_dir / "model.safetensors")
    after = load_file(tmp_path / "out" / "model.safetensors")
    tower = [k for k in before if "visual" in k]
    changed = [k for k in tower if not torch.equal(before[k], after[k])]
    assert tower and (changed == tower if train_tower else not changed)  # every tower weight moves, or none
    assert not torch.equal(
        before["model.layers.0.mlp.down_proj.weight"], after["model.layers.0.mlp.down_proj.weight"]
    )
