"""Output folders that would destroy the user's files are refused before any work, through the real commands:
the current folder (or one holding it), the home folder, a folder that is or holds the command's model or data,
and, for `experiment --overwrite`, a folder holding anything an experiment does not write. Each refusal is one
line, exit 2, and every file the user had is still there, byte for byte."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import assert_cli_error, run_cli


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A current folder holding a user's file."""
    (tmp_path / "notes.txt").write_text("mine")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("out", [".", ".."])
def test_experiment_refuses_the_current_folder_and_its_parents(workdir, capsys, out):
    before = _snapshot(workdir)
    rc, _, err = run_cli(["experiment", "--quick", "--out", out, "--overwrite"], capsys)
    assert_cli_error(rc, err, "experiment", r"--out: \.{1,2} is the current folder or holds it; write into a folder of its own$")  # fmt: skip
    assert _snapshot(workdir) == before


def test_experiment_overwrite_replaces_only_an_experiments_own_folder(workdir, capsys):
    from mirage_trl.folders import write_marker

    out = workdir / "results"
    (out / "seed0").mkdir(parents=True)
    (out / "results.json").write_text('{"runs": []}')
    write_marker(out, "experiment", ["seed0", "results.json"])  # what an experiment wrote there
    (out / "thesis.tex").write_text("years of work")  # what the user added since
    before = _snapshot(out)
    rc, _, err = run_cli(["experiment", "--quick", "--out", out, "--overwrite"], capsys)
    assert_cli_error(rc, err, "experiment", r"holds what mirage-trl did not write there \(thesis\.tex\); --overwrite replaces only a folder mirage-trl wrote: give another --out$")  # fmt: skip
    assert _snapshot(out) == before
    # without a marker, a folder is not the library's (unless it is an older experiment's, all its own)
    (out / ".mirage-trl.json").unlink()
    rc, _, err = run_cli(["experiment", "--quick", "--out", out, "--overwrite"], capsys)
    assert_cli_error(rc, err, "experiment", r"\(results\.json, seed0, thesis\.tex\)")


def test_experiment_refuses_the_home_folder(workdir, capsys, monkeypatch):
    home = workdir / "home"
    home.mkdir()
    (home / ".bashrc").write_text("export X=1")
    monkeypatch.setenv("HOME", str(home))
    rc, _, err = run_cli(["experiment", "--quick", "--out", home, "--overwrite"], capsys)
    assert_cli_error(rc, err, "experiment", r"is your home folder; write into a folder of its own$")
    assert (home / ".bashrc").read_text() == "export X=1"


@pytest.mark.parametrize("which", ["model", "data folder", "a folder holding the model"])
def test_eval_refuses_an_out_that_is_or_holds_its_model_or_data(env, tmp_path, capsys, which):
    model = tmp_path / "models" / "mirage"
    shutil.copytree(env["mirage"], model)
    data = tmp_path / "data"
    shutil.copytree(env["data"].parent, data)
    out = {"model": model, "data folder": data, "a folder holding the model": tmp_path / "models"}[which]
    before = _snapshot(tmp_path)
    argv = ["eval", "--model", model, "--data", data / env["data"].name, "--benchmark", "vsp_planning",
            "--out", out, "--overwrite", "--no-progress"]  # fmt: skip
    rc, _, err = run_cli(argv, capsys)
    what = "the data" if which == "data folder" else "the model"
    assert_cli_error(rc, err, "eval", rf"--out: {out} holds {what} .*; write the results elsewhere$")
    assert _snapshot(tmp_path) == before


def test_eval_refuses_the_current_folder(env, workdir, capsys):
    argv = ["eval", "--model", env["mirage"], "--data", env["data"], "--benchmark", "vsp_planning",
            "--out", ".", "--overwrite", "--no-progress"]  # fmt: skip
    rc, _, err = run_cli(argv, capsys)
    assert_cli_error(rc, err, "eval", r"--out: \. is the current folder or holds it")
    assert (workdir / "notes.txt").read_text() == "mine"


def test_data_vsp_refuses_an_out_holding_its_exclude_file(tmp_path, capsys):
    from mirage_trl.data.vsp import generate_vsp

    test = generate_vsp("planning", [3], 4, split="test", style="direct", seed=1, out_dir=tmp_path / "t", progress=False)  # fmt: skip
    before = _snapshot(tmp_path)
    argv = ["data", "vsp", "--task", "planning", "--split", "train", "--style", "direct", "--levels", "3",
            "--num-samples", "4", "--exclude", test, "--out", tmp_path / "t", "--overwrite"]  # fmt: skip
    rc, _, err = run_cli(argv, capsys)
    assert_cli_error(rc, err, "data", r"--out: .*/t holds --exclude .*planning_test_direct\.jsonl; write the results elsewhere$")  # fmt: skip
    assert _snapshot(tmp_path) == before


def test_a_card_written_on_a_full_disk_leaves_the_old_card_whole(tmp_path, monkeypatch):
    """`Path.write_text` truncated README.md to what fitted; the card is now written beside it and swapped in."""
    import errno
    import os

    from mirage_trl import io
    from mirage_trl.card import write_card

    (tmp_path / "README.md").write_text("the old card\n" * 1000)

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io.os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_card(tmp_path, "a new card\n" * 5000)
    assert (tmp_path / "README.md").read_text() == "the old card\n" * 1000
    assert os.listdir(tmp_path) == ["README.md"]  # no temporary file left


def _eval_json(path: Path, model: Path, **changes) -> Path:
    groups = {"3": {"accuracy": 0.5, "invalid_rate": 0.0}, "all": {"accuracy": 0.5, "invalid_rate": 0.0}}
    results = {
        "benchmark": "vsp_planning",
        "num_rows": 4,
        "model": str(model),
        "modes": {"model": {"groups": groups}},
    }
    results.update(changes)
    path.write_text(__import__("json").dumps(results))
    return path


def test_card_escapes_what_an_eval_json_says(tmp_path, capsys):
    """Mode, level and benchmark names from an eval JSON cannot inject HTML or start a Markdown block."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    groups = {
        "3\n## Injected": {"accuracy": 0.5, "invalid_rate": 0.0},
        "all": {"accuracy": 0.5, "invalid_rate": 0.0},
    }
    hostile = {"<script>alert(1)</script>\n# Owned": {"groups": groups}, "a|b": {"groups": groups}}
    path = _eval_json(tmp_path / "r.json", model, benchmark="<iframe src=x>", modes=hostile)
    rc, _, err = run_cli(["card", model, "--eval-json", path], capsys)
    assert rc == 0, err
    text = (model / "README.md").read_text()
    for raw in ("<script>", "<iframe", "\n# Owned", "\n## Injected", "| a|b |"):
        assert raw not in text, raw
    assert "| &lt;script&gt;alert(1)&lt;/script&gt; # Owned | 50.0 | 50.0 | 0.0 |" in text
    assert "level 3 ## Injected" in text and "| a&#124;b |" in text


def test_card_refuses_a_folder_that_is_not_a_model_and_a_mistyped_eval_json(tmp_path, capsys):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.md").write_text("mine")
    path = _eval_json(tmp_path / "r.json", notes)
    rc, _, err = run_cli(["card", notes, "--eval-json", path], capsys)
    assert_cli_error(rc, err, "card", r"not a model folder \(it has none of config\.json, adapter_config\.json, mirage_config\.json\)")  # fmt: skip
    assert sorted(p.name for p in notes.iterdir()) == ["todo.md"]
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    bad = {"model": {"groups": {"all": {"accuracy": "high", "invalid_rate": 0.0}}}}
    rc, _, err = run_cli(
        ["card", model, "--eval-json", _eval_json(tmp_path / "b.json", model, modes=bad)], capsys
    )
    assert_cli_error(rc, err, "card", r"not the results\.json of `mirage-trl eval` \(no per-mode results with numeric accuracies\)$")  # fmt: skip
    assert not (model / "README.md").exists()


# ------------------------------------------------------------------------------ training output folders
def test_a_training_output_dir_holding_the_users_files_is_refused(env, tmp_path):
    """A training into a folder of the user's (a README.md, a model of theirs) is refused before the model loads;
    a folder a training wrote is resumed, and the model given as input is never the output."""
    from helpers import _recipe_args, _recipe_argv, recipe_main

    from mirage_trl.errors import MirageError

    out = tmp_path / "mine"
    out.mkdir()
    (out / "README.md").write_text("my notes")
    before = _snapshot(out)
    argv = _recipe_argv(env, env["data"], out, "--max_steps", "1", "--save_strategy", "no")
    with pytest.raises(MirageError, match=rf"^--output_dir {out}: holds what no training wrote \(README\.md\); give an empty or new --output_dir$"):  # fmt: skip
        recipe_main("stage1_vsp")(*_recipe_args(argv))
    assert _snapshot(out) == before
    argv = _recipe_argv(env, env["data"], env["mirage"], "--max_steps", "1")
    with pytest.raises(
        MirageError, match=r"^--output_dir: \S+ holds the model \S+; write the results elsewhere$"
    ):
        recipe_main("stage1_vsp")(*_recipe_args(argv))


def test_checkpoint_rotation_deletes_only_the_runs_own_checkpoints(env, tmp_path):
    """The user's `checkpoint-0/`, `checkpoint-1/mine.txt` and `.checkpoint-9.tmp/` beside a run's checkpoints
    survive `save_total_limit=1`; the run's older checkpoints are rotated away; a user's folder where the run
    would save a checkpoint is refused in one line, not replaced."""
    from helpers import _recipe_args, _recipe_argv, recipe_main

    from mirage_trl.errors import MirageError

    out = tmp_path / "run"
    argv = _recipe_argv(
        env, env["data"], out, "--max_steps", "1", "--save_strategy", "steps", "--save_steps", "1"
    )
    recipe_main("stage1_vsp")(*_recipe_args(argv))  # a run of ours: checkpoint-1
    for name, files in {
        "checkpoint-0": {"a.txt": "mine"},
        ".checkpoint-9.tmp": {"b.txt": "mine too"},
    }.items():
        (out / name).mkdir()
        for f, text in files.items():
            (out / name / f).write_text(text)
    theirs = {n: _snapshot(out / n) for n in ("checkpoint-0", ".checkpoint-9.tmp")}
    more = ("--max_steps", "3", "--save_total_limit", "1")
    trainer = recipe_main("stage1_vsp")(*_recipe_args(argv + list(more)))
    assert trainer.state.global_step == 3
    assert sorted(p.name for p in out.glob("*checkpoint-*")) == [
        ".checkpoint-9.tmp",
        "checkpoint-0",
        "checkpoint-3",
    ]
    assert {n: _snapshot(out / n) for n in theirs} == theirs
    # a folder of the user's named like the next checkpoint: refused, kept
    (out / "checkpoint-4").mkdir()
    (out / "checkpoint-4" / "mine.txt").write_text("keep")
    with pytest.raises(
        MirageError, match=r"checkpoint-4 is there and no mirage-trl run wrote it; it is not replaced"
    ):
        recipe_main("stage1_vsp")(*_recipe_args(argv + ["--max_steps", "4", "--save_total_limit", "1"]))
    assert (out / "checkpoint-4" / "mine.txt").read_text() == "keep"


# ------------------------------------------------------------------------------ --out folders
def test_overwrite_swaps_at_the_end_and_an_interrupted_experiment_leaves_the_old_folder(
    workdir, capsys, monkeypatch
):
    """`experiment --overwrite` writes beside --out and swaps at the end: interrupted, the old folder is as it
    was, byte for byte, and no temporary folder is left; completed, it is replaced and marked."""
    import mirage_trl.experiment as experiment
    from mirage_trl.folders import read_marker

    out = workdir / "results"
    calls = []

    def fake_run(cfg, where, **kw):
        calls.append(Path(where))
        (Path(where) / "results.json").write_text('{"runs": []}')
        (Path(where) / "seed0").mkdir()
        (Path(where) / "seed0" / "mirage_config.json").write_text(
            json.dumps({"base": str(Path(where).resolve())})
        )
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the second run
        return {"summary": {"best_arm_level3": {"arm": "x"}}, "wall_seconds": 1.0}

    monkeypatch.setattr(experiment, "run_experiment", fake_run)
    rc, _, err = run_cli(["experiment", "--quick", "--out", out], capsys)
    assert rc == 0, err
    assert calls[0] != out and calls[0].parent == out.parent  # written beside --out
    assert read_marker(out)["entries"] == ["results.json", "seed0"]
    # the paths recorded inside name the final folder, not the temporary one
    assert json.loads((out / "seed0" / "mirage_config.json").read_text())["base"] == str(out.resolve())
    before = _snapshot(out)
    rc, _, err = run_cli(["experiment", "--quick", "--out", out, "--overwrite"], capsys)
    assert rc == 130
    assert _snapshot(out) == before
    assert sorted(p.name for p in workdir.iterdir()) == ["notes.txt", "results"]


def test_a_second_eval_into_the_same_out_is_refused(env, tmp_path, capsys):
    """Two evals into one --out would share `<out>.partial.jsonl`: while one runs (its lock names a live
    process), the other is refused in one line, and nothing of the first is touched."""
    out = tmp_path / "eval"
    (tmp_path / ".eval.lock").write_text("1")  # pid 1 is always alive
    (tmp_path / "eval.partial.jsonl").write_text('{"index": 0}\n')
    argv = ["eval", "--model", env["mirage"], "--benchmark", "vsp_planning", "--data", env["data"], "--out", out]  # fmt: skip
    rc, _, err = run_cli(argv, capsys)
    assert_cli_error(rc, err, "eval", rf"--out {out}: another process \(pid 1\) is writing there; wait for it to finish or give another --out$")  # fmt: skip
    assert (tmp_path / "eval.partial.jsonl").read_text() == '{"index": 0}\n' and not out.exists()
