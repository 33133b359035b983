"""The step guard: a skipped step changes no weight and no
optimizer state and is not logged as loss 0.0; a non-finite gradient stops before the optimizer step with
the last checkpoint intact; bad learning rates are refused at start; divergence with finite numbers is warned."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from helpers import sft_args
from safetensors.torch import load_file
from transformers import TrainerCallback

from mirage_trl.errors import MirageError


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    from mirage_trl.data.reference import load_reference_jsonl
    from mirage_trl.data.vsp import generate_vsp

    root = tmp_path_factory.mktemp("guard")
    data = generate_vsp(
        "planning", [3], 2, split="train", style="cot", seed=0, out_dir=root / "d", progress=False
    )
    return load_reference_jsonl(data)


def trainer_for(out, rows, **kw):
    from mirage_trl.models.tiny import build_tiny_model
    from mirage_trl.trainers.sft import MirageSFTTrainer

    model, processor = build_tiny_model(seed=0)
    args = sft_args(out, **{"max_steps": 3, "learning_rate": 1e-2, "weight_decay": 0.1, **kw})
    return MirageSFTTrainer(model=model, args=args, train_dataset=rows, processing_class=processor)


def _snapshot(trainer):
    params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    state = {
        (i, k): v.clone() if torch.is_tensor(v) else v
        for i, s in trainer.optimizer.state_dict()["state"].items()
        for k, v in s.items()
    }
    return params, state


class Snapshots(TrainerCallback):
    """Weights and optimizer state after each optimizer step."""

    def __init__(self, trainer):
        self.trainer, self.at = trainer, {}

    def on_step_end(self, args, state, control, **kw):
        self.at[state.global_step] = _snapshot(self.trainer)


def _equal(a, b):
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a
    )


def _nan_hidden_at(trainer, step):
    from mirage_trl.models.families import text_model

    return text_model(trainer.model).norm.register_forward_hook(
        lambda m, i, o: o * float("nan") if trainer.state.global_step == step else o
    )


def _inf_grad_at(trainer, step):
    p = next(p for n, p in trainer.model.named_parameters() if p.requires_grad and "embed" in n)
    return p.register_hook(lambda g: g * float("inf") if trainer.state.global_step == step else g)


def test_skipped_step_after_good_ones_changes_no_weight_nor_optimizer_state(rows, tmp_path):
    trainer = trainer_for(tmp_path / "o", rows, skip_nonfinite_steps=True)
    snaps = Snapshots(trainer)
    trainer.add_callback(snaps)
    _nan_hidden_at(
        trainer, 1
    )  # the second step's loss is NaN: AdamW's momentum and decay must not move weights
    trainer.train()
    (p1, s1), (p2, s2), (p3, _) = snaps.at[1], snaps.at[2], snaps.at[3]
    assert _equal(p1, p2) and _equal(s1, s2)
    assert not _equal(p2, p3)  # the next good step trains again
    losses = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
    assert math.isnan(losses[2]) and losses[1] > 0 and losses[3] > 0  # skipped, not 0.0
    assert [h["skipped_steps"] for h in trainer.state.log_history if "skipped_steps" in h] == [1.0]


def test_train_can_be_called_again_and_the_guard_still_skips(rows, tmp_path):
    """A second `train()` in the same process (the bench's rounds, a notebook) gets the first one's optimizer back:
    its guarded step must still be a method an LR scheduler can wrap, and still skip a bad step."""
    trainer = trainer_for(tmp_path / "o", rows, skip_nonfinite_steps=True, max_steps=2)
    trainer.train()
    before = _snapshot(trainer)[0]
    snaps = Snapshots(trainer)
    trainer.add_callback(snaps)
    _nan_hidden_at(trainer, 0)  # the second run starts at step 0 again: its first step is skipped
    trainer.train()
    p1, p2 = snaps.at[1][0], snaps.at[2][0]
    assert _equal(before, p1) and not _equal(p1, p2)  # skipped, then the next good step trains
    assert [h["skipped_steps"] for h in trainer.state.log_history if "skipped_steps" in h] == [1.0]


def test_nonfinite_gradient_stops_before_the_step_and_checkpoints_stay_finite(rows, tmp_path):
    out = tmp_path / "o"
    trainer = trainer_for(out, rows, save_strategy="steps", save_steps=1)
    _inf_grad_at(trainer, 2)  # finite loss, infinite gradient at the third step
    with pytest.raises(
        MirageError, match=r"^step 2: non-finite gradient norm \(NaN or inf\) before the optimizer step"
    ):
        trainer.train()
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    saved = sorted(p.name for p in out.iterdir() if p.name.startswith((".", "checkpoint")))
    assert saved == ["checkpoint-1", "checkpoint-2"], saved
    for name in saved:
        tensors = load_file(str(out / name / "model.safetensors"))
        assert tensors and all(torch.isfinite(t).all() for t in tensors.values())


def test_nonfinite_gradient_is_skipped_in_skip_mode(rows, tmp_path):
    trainer = trainer_for(tmp_path / "o", rows, skip_nonfinite_steps=True)
    snaps = Snapshots(trainer)
    trainer.add_callback(snaps)
    _inf_grad_at(trainer, 1)
    trainer.train()
    assert _equal(snaps.at[1][0], snaps.at[2][0]) and _equal(snaps.at[1][1], snaps.at[2][1])
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert trainer.num_skipped_steps == 1


@pytest.mark.parametrize("lr", [float("inf"), float("nan"), 0.0, -1e-4])
@pytest.mark.parametrize("config", ["sft", "grpo"])
def test_bad_learning_rate_is_refused_at_start(tmp_path, lr, config):
    from mirage_trl.configs import MirageGRPOConfig, MirageSFTConfig

    cls = MirageSFTConfig if config == "sft" else MirageGRPOConfig
    extra = {} if config == "sft" else dict(num_generations=2, per_device_train_batch_size=2)
    with pytest.raises(MirageError, match=r"^--learning_rate \S+: must be a finite number > 0$"):
        cls(output_dir=str(tmp_path), use_cpu=True, learning_rate=lr, **extra)


@pytest.mark.parametrize(
    "flag, value, pattern",
    [
        ("max_length", 0, r"--max_length 0: must be an integer from 1"),
        ("max_latent_norm", -1.0, r"--max_latent_norm -1.0: must be a finite number > 0"),
        ("max_latent_norm", float("inf"), r"--max_latent_norm inf: must be a finite number > 0"),
        ("text_loss_weight", float("nan"), r"--text_loss_weight nan: must be a finite number >= 0"),
        ("text_loss_weight", -0.5, r"--text_loss_weight -0.5: must be a finite number >= 0"),
        ("latent_size", 1000, r"--latent_size 1000: must be an integer from 1 to 64"),
        ("latent_size", 0, r"--latent_size 0: must be an integer from 1 to 64"),
        ("per_device_train_batch_size", 0, r"--per_device_train_batch_size 0: must be an integer from 1"),
    ],
)
def test_numeric_settings_are_bounded_naming_the_flag(tmp_path, flag, value, pattern):
    from mirage_trl.configs import MirageSFTConfig

    with pytest.raises(MirageError, match=pattern):
        MirageSFTConfig(output_dir=str(tmp_path), use_cpu=True, **{flag: value})


def test_grpo_generation_lengths_are_bounded(tmp_path):
    from mirage_trl.configs import MirageGRPOConfig

    with pytest.raises(MirageError, match=r"--max_completion_length 0: must be an integer from 1"):
        MirageGRPOConfig(
            output_dir=str(tmp_path),
            use_cpu=True,
            num_generations=2,
            per_device_train_batch_size=2,
            max_completion_length=0,
        )


def test_divergence_with_finite_numbers_is_warned_with_the_step(caplog):
    from transformers import TrainerControl, TrainerState

    from mirage_trl.trainers.common import DivergenceCallback

    cb, state = DivergenceCallback(), TrainerState()
    with caplog.at_level(logging.WARNING, logger="mirage_trl.trainers.common"):
        for step, loss, grad in [
            (1, 2.0, 1.0),
            (2, 3.0, 1.0),
            (7, 25.0, 1.0),
            (8, 30.0, 0.0),
            (9, 40.0, 0.0),
        ]:
            state.global_step = step
            cb.on_log(None, state, TrainerControl(), logs={"loss": loss, "grad_norm": grad})
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2  # once each
    assert messages[0].startswith("step 7: loss 25 is over 10x its first logged value 2")
    assert messages[1].startswith("step 8: the gradient norm is 0")
