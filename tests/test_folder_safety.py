"""Output folders that would destroy the user's files are refused before any work, through the real commands:
the current folder (or one holding it), the home folder, a folder that is or holds the command's model or data,
and, for `experiment --overwrite`, a folder holding anything an experiment does not write. Each refusal is one
line, exit 2, and every file the user had is still there, byte for byte."""

from __future__ import annotations

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
    out = workdir / "results"
    (out / "seed0").mkdir(parents=True)
    (out / "results.json").write_text("{}")
    (out / "thesis.tex").write_text("years of work")
    before = _snapshot(out)
    rc, _, err = run_cli(["experiment", "--quick", "--out", out, "--overwrite"], capsys)
    assert_cli_error(rc, err, "experiment", r"holds what an experiment does not write \(thesis\.tex\); --overwrite replaces only an experiment's own folder$")  # fmt: skip
    assert _snapshot(out) == before


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
