"""The README's Python example, run exactly as printed (its shell lines first, through the real command), so it
cannot go stale: both stages train, and decoding returns text."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys

from helpers import REPO


def _blocks(language: str) -> list[str]:
    section = (REPO / "README.md").read_text().split("## Python API", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{language}\n(.*?)```", section, flags=re.S)


def test_the_readme_python_example_runs_as_printed(tmp_path):
    (shell,) = _blocks("bash")
    (code,) = _blocks("python")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for line in shell.strip().splitlines():
        argv = shlex.split(line.split("#", 1)[0])
        assert argv[0] == "mirage-trl", line
        subprocess.run(
            [sys.executable, "-m", "mirage_trl", *argv[1:]], cwd=tmp_path, env=env, check=True, timeout=300
        )
    (tmp_path / "example.py").write_text(code)
    p = subprocess.run(
        [sys.executable, "example.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert p.returncode == 0, p.stderr[-3000:]
    for stage in ("stage1", "stage2"):  # both stages trained and saved a Mirage model with k = 4
        config = json.loads((tmp_path / stage / "config.json").read_text())
        assert config["mirage"]["latent_size"] == 4, config.get("mirage")
    assert re.fullmatch(r"latent spans: \d+", p.stdout.strip().splitlines()[-1]), p.stdout
    assert p.stdout.count("train_runtime") == 2  # the Trainer's summary line of each stage
