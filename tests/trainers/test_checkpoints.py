"""Checkpoints are atomic: a `checkpoint-N` folder is complete or absent.
A save killed midway leaves only a hidden staging folder (removed by the next save); resuming from, exporting
or evaluating a partial checkpoint is one line naming the newest complete one."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mirage_trl.errors import MirageError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def setup(tiny_run_inputs):
    return tiny_run_inputs


def _train_code(model, data, out, kill_at_step=None):
    kill = ""
    if kill_at_step is not None:
        # SIGKILL inside the Trainer's save, after the weights of checkpoint-N are written, before its state.
        kill = (
            "import transformers.trainer as T\n"
            "real = T.TrainerState.save_to_json\n"
            "def save(self, path):\n"
            f"    if self.global_step == {kill_at_step}:\n"
            "        os.kill(os.getpid(), signal.SIGKILL)\n"
            "    real(self, path)\n"
            "T.TrainerState.save_to_json = save\n"
        )
    return (
        "import os, signal\n" + kill + "from mirage_trl.configs import MirageSFTConfig\n"
        "from mirage_trl.data.reference import load_reference_jsonl\n"
        "from mirage_trl.trainers.sft import MirageSFTTrainer\n"
        f"args = MirageSFTConfig(output_dir={str(out)!r}, use_cpu=True, report_to=[], save_strategy='steps', "
        "save_steps=1, max_steps=3, per_device_train_batch_size=2, gradient_checkpointing=False, "
        "disable_tqdm=True, latent_size=2, learning_rate=1e-3)\n"
        f"MirageSFTTrainer(model={str(model)!r}, args=args, "
        f"train_dataset=load_reference_jsonl({str(data)!r})).train()\n"
    )


def test_killed_save_leaves_no_partial_checkpoint_and_the_next_save_cleans_up(setup, tmp_path):
    model, data = setup
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    p = subprocess.run(
        [sys.executable, "-c", _train_code(model, data, out, kill_at_step=2)], env=env, timeout=300
    )
    assert p.returncode == -signal.SIGKILL
    names = sorted(x.name for x in out.iterdir())
    assert "checkpoint-1" in names and "checkpoint-2" not in names, names
    assert ".checkpoint-2.tmp" in names  # the staging folder of the killed save
    from mirage_trl.checkpoints import checkpoint_is_complete

    assert checkpoint_is_complete(out / "checkpoint-1")
    p = subprocess.run([sys.executable, "-c", _train_code(model, data, out)], env=env, timeout=300)
    assert p.returncode == 0
    names = sorted(x.name for x in out.iterdir() if x.name.startswith((".", "checkpoint")))
    assert names == ["checkpoint-1", "checkpoint-2", "checkpoint-3"], names
    assert all((out / n / "mirage_config.json").is_file() and checkpoint_is_complete(out / n) for n in names)


def test_partial_checkpoint_is_refused_naming_the_newest_complete_one(setup, tmp_path, capsys):
    model, data = setup
    out = tmp_path / "run"
    p = subprocess.run(
        [sys.executable, "-c", _train_code(model, data, out)],
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        timeout=300,
    )
    assert p.returncode == 0
    partial = out / "checkpoint-4"
    shutil.copytree(out / "checkpoint-3", partial)
    (partial / "trainer_state.json").unlink()  # what a save interrupted by another writer would leave
    pattern = rf"{partial}: not a complete checkpoint \(no trainer_state.json.*the newest complete one is \S+checkpoint-3"

    from mirage_trl.checkpoints import check_resume_checkpoint

    with pytest.raises(MirageError, match=rf"^--resume_from_checkpoint {pattern}"):
        check_resume_checkpoint(partial)
    from mirage_trl.cli import main

    rc = main(["export", "--model", str(partial), "--out", str(tmp_path / "e")])
    err = capsys.readouterr().err
    assert rc == 2 and __import__("re").search(pattern, err), err
    with pytest.raises(MirageError, match=r"--resume_from_checkpoint \S+: is a file"):
        check_resume_checkpoint(out / "checkpoint-3" / "trainer_state.json")
    with pytest.raises(MirageError, match=r"--resume_from_checkpoint \S+: no such checkpoint folder"):
        check_resume_checkpoint(out / "checkpoint-99")
