"""Folders that are not Mirage models, and existing output folders. (docs/reliability.md)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers import (
    assert_cli_error,
    run_cli,
)

from mirage_trl.errors import MirageError


def test_non_mirage_folder_to_eval_and_export(env, tmp_path, capsys):
    from mirage_trl.models.load import load_model

    data_dir = env["data"].parent  # a folder, but not a model
    rc, _, err = run_cli(
        [
            "eval",
            "--model",
            data_dir,
            "--benchmark",
            "vsp_planning",
            "--data",
            env["data"],
            "--out",
            tmp_path / "e",
        ],
        capsys,
    )
    assert_cli_error(rc, err, "eval", re.escape(str(data_dir)) + " is neither a model folder")
    rc, _, err = run_cli(["export", "--model", env["base"], "--out", tmp_path / "x"], capsys)
    assert_cli_error(rc, err, "export", re.escape(str(env["base"])) + " is not a Mirage model")
    rc, _, err = run_cli(["export", "--model", data_dir, "--out", tmp_path / "x"], capsys)
    assert_cli_error(rc, err, "export", re.escape(str(data_dir)) + " is neither a model folder")
    with pytest.raises(MirageError, match="is not a Mirage model"):
        load_model(env["base"])
    assert not (tmp_path / "e").exists() and not (tmp_path / "x").exists()


def _existing(tmp_path) -> Path:
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    return out


@pytest.mark.parametrize("command", ["data vsp", "data jigsaw", "eval", "export"])
def test_existing_output_folder_is_refused(env, tmp_path, capsys, command):
    out = _existing(tmp_path)
    argv = {
        "data vsp": ["data", "vsp", "--task", "planning", "--levels", "3", "--num-samples", "2"],
        "data jigsaw": ["data", "jigsaw", "--images", env["data"].parent / "images", "--num-samples", "2"],
        "eval": ["eval", "--model", env["mirage"], "--benchmark", "vsp_planning", "--data", env["data"]],
        "export": ["export", "--model", env["mirage"]],
    }[command]
    rc, _, err = run_cli([*argv, "--out", out], capsys)
    assert_cli_error(
        rc,
        err,
        command.split()[0],
        re.escape(f"--out: {out} already exists and is not empty (pass --overwrite"),
    )
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists"]  # no temp folder either
