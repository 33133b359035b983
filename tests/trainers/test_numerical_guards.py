"""The numerical guard of the trainers: a non-finite loss or latent stops naming the step and term, or is skipped without changing any weight; the latent-norm bound. (docs/reliability.md)."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    _nan_final_norm,
    _params,
    _skipped,
    no_checkpoint,
    sft_trainer,
)

from mirage_trl.errors import MirageError


def test_nan_loss_stops_stage1_naming_step_and_term(guard_rows, tmp_path):
    trainer = sft_trainer(tmp_path / "out", guard_rows, max_steps=2)
    handle = _nan_final_norm(trainer)
    with pytest.raises(
        MirageError, match=r"^step 0: non-finite loss \(NaN or inf\).*skip_nonfinite_steps=True"
    ):
        trainer.train()
    handle.remove()
    assert no_checkpoint(tmp_path / "out")


def test_nan_helper_target_names_the_latents(guard_rows, tmp_path, monkeypatch):
    import mirage_trl.trainers.sft as sft

    real = sft.helper_latent_targets
    monkeypatch.setattr(sft, "helper_latent_targets", lambda *a, **k: real(*a, **k) * float("nan"))
    trainer = sft_trainer(tmp_path / "out", guard_rows)
    with pytest.raises(MirageError, match=r"^step 0: non-finite loss, latents"):
        trainer.train()


def test_skip_nonfinite_step_is_counted_and_changes_no_weight(guard_rows, tmp_path):
    trainer = sft_trainer(tmp_path / "out", guard_rows, skip_nonfinite_steps=True, max_steps=1)
    handle = _nan_final_norm(trainer)
    before = _params(trainer.model)
    trainer.train()
    handle.remove()
    after = _params(trainer.model)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert _skipped(trainer) == [1.0] and trainer.num_skipped_steps == 1


def test_stage2_latent_norm_bound_stops_or_skips(guard_rows, tmp_path):
    trainer = sft_trainer(tmp_path / "a", guard_rows, stage=2, max_latent_norm=1e-3)
    with pytest.raises(
        MirageError, match=r"^step 0: latent norm \S+ exceeds max_latent_norm=0\.001 \(raise max_latent_norm"
    ):
        trainer.train()
    trainer = sft_trainer(
        tmp_path / "b", guard_rows, stage=2, max_latent_norm=1e-3, skip_nonfinite_steps=True
    )
    before = _params(trainer.model)
    trainer.train()
    after = _params(trainer.model)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert _skipped(trainer) == [1.0]
