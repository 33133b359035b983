"""`mirage-trl plot`: the training curves read from trainer_state.json, and the PNG drawn from them."""

from __future__ import annotations

import json

import pytest
from helpers import run_cli

from mirage_trl.curves import find_state, read_curves
from mirage_trl.errors import MirageError

HISTORY = [
    {"step": 1, "epoch": 0.1, "loss": 2.0, "learning_rate": 1e-3, "latent/norm": 8.0},
    {"step": 2, "epoch": 0.2, "loss": 1.5, "learning_rate": 9e-4, "latent/norm": 7.5, "val/accuracy": 0.25},
    {"step": 2, "train_runtime": 3.0, "train_loss": 1.75},
]


def _run(folder, history=HISTORY):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 2, "log_history": history}))
    return folder


def test_curves_are_the_logged_numbers_in_step_order(tmp_path):
    curves = read_curves(find_state(_run(tmp_path / "run")))
    assert curves["loss"] == ([1, 2], [2.0, 1.5])
    assert curves["latent/norm"] == ([1, 2], [8.0, 7.5])
    assert curves["val/accuracy"] == ([2], [0.25]) and curves["train_loss"] == ([2], [1.75])
    assert "epoch" not in curves and "train_runtime" not in curves


def test_plot_command_draws_every_curve(tmp_path, capsys):
    from PIL import Image

    run = _run(tmp_path / "run")
    rc, out, err = run_cli(["plot", run], capsys)
    assert rc == 0, err
    assert Image.open(run / "training_curves.png").format == "PNG"
    assert out.startswith("5 curves from ")


def test_newest_checkpoint_is_read_when_the_run_has_no_state(tmp_path):
    run = tmp_path / "run"
    _run(run / "checkpoint-1", HISTORY[:1])
    _run(run / "checkpoint-2")
    (run / "checkpoint-3").mkdir()  # incomplete: no trainer_state.json
    assert find_state(run) == run / "checkpoint-2" / "trainer_state.json"


def test_bad_folders_are_one_line(tmp_path, capsys):
    rc, _, err = run_cli(["plot", tmp_path / "nowhere"], capsys)
    assert (
        rc == 2
        and err.strip() == f"mirage-trl plot: error: {tmp_path / 'nowhere'}: no such training output folder"
    )
    (tmp_path / "empty").mkdir()
    with pytest.raises(MirageError, match="no trainer_state.json"):
        find_state(tmp_path / "empty")
    with pytest.raises(MirageError, match="holds no numbers"):
        read_curves(find_state(_run(tmp_path / "r2", [{"step": 1, "epoch": 1.0}])))
