"""`--debug`, and recipes run under `run.run_recipe`: one line and exit 2, a trace only when asked. (docs/reliability.md)."""

from __future__ import annotations

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
    """What a recipe user sees, with the recipe file run as `python recipes/stage1_vsp.py` does, under
    `mirage_trl.run.run_recipe` (every recipe's __main__)."""
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
    code = (
        "import runpy, sys\n"
        "from mirage_trl.run import run_recipe\n"
        f"sys.argv = {argv!r}\n"
        f"run_recipe(lambda: runpy.run_path({str(REPO / 'recipes/stage1_vsp.py')!r}, run_name='__main__'))\n"
    )
    p = subprocess.run(
        [sys.executable, "-c", code],
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


def test_every_recipe_runs_under_run_recipe():
    recipes = sorted((REPO / "recipes").glob("*.py"))
    assert recipes and all("run_recipe(" in p.read_text() for p in recipes)
