"""A quiet console: no deprecation notice from our own settings, the launch lines pass the thread count, progress
bars only on a terminal (a log file gets one line per logging step), and `--help` shows each default once."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings

import pytest
from helpers import REPO

from mirage_trl.configs import BaselineSFTConfig, MirageGRPOConfig, MirageSFTConfig

SMOKE = REPO / "recipes" / "tiny" / "stage1" / "config_vsp_smoke.yaml"


@pytest.mark.parametrize("config", [MirageSFTConfig, BaselineSFTConfig, MirageGRPOConfig])
@pytest.mark.parametrize("value", [True, False])
def test_checkpointing_setting_reaches_the_trainer_without_a_deprecation_notice(config, value):
    """TRL's configs default `gradient_checkpointing` to True and the recipe YAMLs set it: the value is kept
    (under both names) and transformers has nothing to warn about."""
    extra = {"num_generations": 2, "per_device_train_batch_size": 2} if config is MirageGRPOConfig else {}
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        args = config(output_dir="o", use_cpu=True, report_to="none", gradient_checkpointing=value, **extra)
    assert args.gradient_checkpointing is value
    if hasattr(args, "activation_checkpointing"):
        assert args.activation_checkpointing is value


def test_progress_bar_only_on_a_terminal(monkeypatch):
    class Stream:
        def __init__(self, tty):
            self.tty = tty

        def isatty(self):
            return self.tty

        def write(self, text):
            return len(text)

        def flush(self):
            pass

    for tty in (True, False):
        monkeypatch.setattr(sys, "stderr", Stream(tty))
        assert MirageSFTConfig(output_dir="o", use_cpu=True).disable_tqdm is (not tty)
    assert (
        MirageSFTConfig(output_dir="o", use_cpu=True, disable_tqdm=False).disable_tqdm is False
    )  # asked for


def _help(argv):
    return subprocess.run(
        [sys.executable, *map(str, argv), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, PYTHONPATH=str(REPO), COLUMNS="200"),
    ).stdout


@pytest.mark.parametrize(
    "argv",
    [
        [REPO / "recipes" / "stage1_vsp.py"],
        [REPO / "recipes" / "grpo_vsp.py"],
        [REPO / "recipes" / "text_sft_vsp.py"],
        ["-m", "mirage_trl", "eval"],
        ["-m", "mirage_trl", "export"],
        ["-m", "mirage_trl", "data", "vsp"],
    ],
    ids=["stage1", "grpo", "text_sft", "eval", "export", "data-vsp"],
)
def test_help_shows_each_default_once(argv):
    text = _help(argv)
    assert "--help" in text
    assert "(default: None)" not in text
    # an option whose help states its default gets no second "(default: ...)"
    entries = re.split(r"\n  (?=-)", text)
    twice = [e.split()[0] for e in entries if e.lower().count("default") > 1 and "(default:" in e]
    assert not twice, twice
    if "stage1" in str(argv[0]):  # a TRL field without a stated default still shows it
        assert "--learning_rate LEARNING_RATE" in text and "(default: 2e-05)" in text


def test_a_training_in_a_log_file_prints_no_warning_of_ours_and_one_line_per_logging_step(
    tmp_path, tiny_run_inputs
):
    """The demo's launch line (accelerate launch with the thread count) into a log file, not a terminal: no
    FutureWarning about our settings, no accelerate notice about the launch line, no per-step progress bar,
    one line of logs per logging step."""
    model, data = tiny_run_inputs
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    p = subprocess.run(
        [sys.executable, "-m", "mirage_trl", "train", REPO / "recipes" / "stage1_vsp.py", "--cpu", "--config", SMOKE,
         "--model_name_or_path", model, "--dataset_name", data, "--output_dir", tmp_path / "out", "--max_steps", "2",
         "--logging_steps", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(env, PYTHONPATH=str(REPO)),
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    both = p.stdout + p.stderr
    assert "Warning" not in both, both[-3000:]
    assert "were not passed to `accelerate launch`" not in both
    assert "it/s]" not in both and "s/it]" not in both  # no progress bar
    logged = [line for line in both.splitlines() if "'loss'" in line or '"loss"' in line]
    assert len(logged) == 2, both[-3000:]
