"""`--debug`, and recipes run under `run.run_recipe`: one line and exit 2, a trace only when asked. (docs/reliability.md)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import _malformed, _missing_field

from mirage_trl.errors import MirageError

REPO = Path(__file__).resolve().parents[1]
SECRET = "hf_reliabilitySECRET0123456789"


def test_cli_subprocess_one_line_and_debug_shows_trace(env, tmp_path):
    bad, pattern = _malformed(env, tmp_path)
    cmd = [sys.executable, "-m", "mirage_trl"]
    run = dict(capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=120)
    p = subprocess.run([*cmd, "data", "check", "--data", str(bad)], **run)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and re.search(pattern, p.stderr), p.stderr
    p = subprocess.run([*cmd, "--debug", "data", "check", "--data", str(bad)], **run)
    assert p.returncode != 0 and "Traceback" in p.stderr and "MirageError" in p.stderr


def test_recipe_subprocess_one_line_through_run_recipe(env, tmp_path):
    """What a recipe user sees running `python recipes/stage1_vsp.py ...`: one line from
    `mirage_trl.run.run_recipe` (every recipe's __main__), exit 2, no credential."""
    bad, pattern = _missing_field(env, tmp_path)
    out = tmp_path / "run"
    argv = [
        "stage1_vsp.py",
        "--config",
        str(REPO / "recipes/tiny/stage1/config_vsp_smoke.yaml"),
        "--dataset_name",
        str(bad),
        "--model_name_or_path",
        str(env["mirage"]),
        "--output_dir",
        str(out),
        "--latent_size",
        "2",
    ]
    p = subprocess.run(
        [sys.executable, str(REPO / "recipes" / "stage1_vsp.py"), *argv[1:]],
        capture_output=True,
        text=True,
        timeout=180,
        env=dict(os.environ, PYTHONPATH=str(REPO), HF_TOKEN=SECRET),
    )
    lines = [line for line in p.stderr.splitlines() if line.startswith("stage1_vsp.py: error:")]
    assert p.returncode == 2 and "Traceback" not in p.stderr and len(lines) == 1, p.stderr
    assert re.search(pattern, lines[0]) and SECRET not in p.stderr + p.stdout
    assert not out.exists()


def test_run_recipe_debug_env_shows_trace(monkeypatch, capsys):
    from mirage_trl.run import run_recipe

    def boom():
        raise MirageError("x.jsonl:3:text_input: missing required field")

    with pytest.raises(SystemExit) as e:
        run_recipe(boom, prog="stage1_vsp.py")
    assert e.value.code == 2
    assert capsys.readouterr().err == "stage1_vsp.py: error: x.jsonl:3:text_input: missing required field\n"
    monkeypatch.setenv("MIRAGE_TRL_DEBUG", "1")
    with pytest.raises(MirageError):
        run_recipe(boom)
    assert run_recipe(lambda: 7) == 7


def test_every_recipe_runs_under_run_recipe(monkeypatch, capsys):
    """Every recipe's `__main__` is `launch(main, ARGS)`, which runs its main under `run_recipe`: the parsed
    arguments and the script's fixed ones reach `main`, and an error in it is one line and exit 2."""
    recipes = sorted((REPO / "recipes").glob("*.py"))
    assert recipes and all("launch(main, ARGS" in p.read_text() for p in recipes)
    from mirage_trl import run

    monkeypatch.setattr(run, "parse_recipe_args", lambda classes: tuple(c.__name__ for c in classes))
    monkeypatch.setattr(sys, "argv", ["recipes/stage1_vsp.py"])

    def main(*args, **fixed):
        raise MirageError(f"bad {args} {fixed}")

    with pytest.raises(SystemExit) as stop:
        run.launch(main, (int, str), stage=1)
    assert stop.value.code == 2
    assert capsys.readouterr().err == "stage1_vsp.py: error: bad ('int', 'str') {'stage': 1}\n"


def test_recipe_honours_or_refuses_stage(env, tmp_path):
    """A stage on the command line is honoured or refused, never overwritten; unset, it is the recipe's."""
    from helpers import _recipe_args, _recipe_argv, recipe_main

    args = _recipe_args(_recipe_argv(env, env["data"], tmp_path / "a", "--stage", "2"))
    with pytest.raises(
        MirageError, match=r"^--stage 2: recipes/stage1_vsp.py runs stage 1; use the stage-2 recipe"
    ):
        recipe_main("stage1_vsp")(*args)
    assert not (tmp_path / "a").exists()
    script_args, training_args, model_args = _recipe_args(_recipe_argv(env, env["data"], tmp_path / "b"))
    assert training_args.stage is None
    trainer = recipe_main("stage1_vsp")(script_args, training_args, model_args)
    assert trainer.args.stage == 1
    assert json.loads((tmp_path / "b" / "mirage_config.json").read_text())["stages"] == [1]
    # stage 2 from that output: the stages and their launch lines accumulate, in order, into the card
    argv = _recipe_argv(env, env["data"], tmp_path / "c")
    argv[argv.index("--model_name_or_path") + 1] = tmp_path / "b"
    recipe_main("stage2_vsp")(*_recipe_args(argv))
    saved = json.loads((tmp_path / "c" / "mirage_config.json").read_text())
    assert saved["stages"] == [1, 2] and len(saved["launch"]) == 2
    card = (tmp_path / "c" / "README.md").read_text()
    assert card.index("# stage 1\n") < card.index("# stage 2\n"), card


def test_recipe_resumes_from_the_newest_checkpoint_in_output_dir(env, tmp_path, caplog):
    """Run again into the same output_dir with more steps: training goes on from checkpoint-2 (as
    alignment-handbook's scripts do), and the metrics and trainer state are saved."""
    import logging

    from helpers import _recipe_args, _recipe_argv, recipe_main

    out = tmp_path / "run"
    first = ("--max_steps", "2", "--save_strategy", "steps", "--save_steps", "2")
    recipe_main("stage1_vsp")(*_recipe_args(_recipe_argv(env, env["data"], out, *first)))
    assert (out / "checkpoint-2").is_dir() and (out / "train_results.json").is_file()
    with caplog.at_level(logging.INFO, logger="mirage_trl.run"):
        again = ("--max_steps", "3", "--save_strategy", "no")
        trainer = recipe_main("stage1_vsp")(*_recipe_args(_recipe_argv(env, env["data"], out, *again)))
    assert f"resuming training from {out / 'checkpoint-2'}" in caplog.text
    assert trainer.state.global_step == 3
    steps_logged = [h["step"] for h in trainer.state.log_history if "loss" in h]
    assert steps_logged == sorted(set(steps_logged))  # the resumed run continues the history, no step twice
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 3


def test_a_resume_with_changed_arguments_or_of_a_finished_run_is_refused(env, tmp_path):
    """Run again into an output folder with another learning rate or seed: refused, naming each flag with its old
    and new value (it used to 'resume', train 0 steps and record the new launch beside the old weights). The
    same run with more steps resumes; the same run again, already finished, says so and trains nothing."""
    from helpers import _recipe_args, _recipe_argv, recipe_main

    out = tmp_path / "run"
    first = ("--max_steps", "2", "--save_strategy", "steps", "--save_steps", "2", "--learning_rate", "1e-3")
    recipe_main("stage1_vsp")(*_recipe_args(_recipe_argv(env, env["data"], out, *first)))
    saved = json.loads((out / "checkpoint-2" / "run_args.json").read_text())
    assert saved["learning_rate"] == 1e-3 and "hub_token" not in saved
    before = (out / "model.safetensors").read_bytes()
    changed = ("--max_steps", "3", "--learning_rate", "1e-4", "--seed", "43")
    with pytest.raises(MirageError) as e:
        recipe_main("stage1_vsp")(*_recipe_args(_recipe_argv(env, env["data"], out, *changed)))
    assert str(e.value) == (
        f"--output_dir: {out / 'checkpoint-2'} was trained with other arguments (--learning_rate 0.001 -> 0.0001; "
        "--seed 42 -> 43); resume with the same arguments, or start afresh with a new --output_dir"
    )
    with pytest.raises(MirageError, match=r"the run there already finished \(checkpoint-2 is step 2 of 2\); nothing to train: give a new --output_dir, or a larger --max_steps to train on$"):  # fmt: skip
        recipe_main("stage1_vsp")(*_recipe_args(_recipe_argv(env, env["data"], out, *first)))
    assert (out / "model.safetensors").read_bytes() == before  # nothing trained, nothing replaced


def test_a_second_training_into_the_same_output_folder_is_refused(env, tmp_path):
    """While a run holds its output folder (its lock names a live process), another is refused in one line; a lock
    left by a process that is gone is taken over; the lock is gone when the run ends."""
    from helpers import _recipe_args, _recipe_argv, recipe_main

    from mirage_trl.folders import LOCK_FILE

    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_FILE).write_text("1")  # pid 1 is always alive
    argv = _recipe_argv(env, env["data"], out, "--max_steps", "1", "--save_strategy", "no")
    with pytest.raises(
        MirageError, match=rf"^--output_dir {out}: another process \(pid 1\) is writing there"
    ):
        recipe_main("stage1_vsp")(*_recipe_args(argv))
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    (out / LOCK_FILE).write_text(dead.stdout.strip())
    trainer = recipe_main("stage1_vsp")(*_recipe_args(argv))
    assert trainer.state.global_step == 1 and not (out / LOCK_FILE).exists()
