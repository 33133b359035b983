"""Security defaults: no trust_remote_code, safetensors only, no credential printed. (docs/reliability.md)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from helpers import (
    run_cli,
)

REPO = Path(__file__).resolve().parents[1]
SECRET = "hf_reliabilitySECRET0123456789"


def test_no_trust_remote_code_in_the_source():
    hits = []
    for path in sorted((REPO / "mirage_trl").rglob("*.py")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"trust_remote_code\s*[=:]\s*True|trust_remote_code\s*=\s*(1|\"|')", line):
                hits.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
            if re.search(r"\btorch\.load\(|\bpickle\.loads?\(", line):
                hits.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    for path in sorted((REPO / "recipes").rglob("*.yaml")):
        if re.search(r"^\s*trust_remote_code:\s*true", path.read_text(), re.M | re.I):
            hits.append(str(path.relative_to(REPO)))
    assert not hits, hits


def test_loaders_pass_trust_remote_code_false(env, monkeypatch):
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoTokenizer

    from mirage_trl.models.load import load_for_training, load_model

    seen = []
    for cls in (AutoConfig, AutoTokenizer, AutoModelForImageTextToText):
        orig = cls.from_pretrained

        def spy(*a, _orig=orig, **k):
            seen.append(k.get("trust_remote_code", False))
            return _orig(*a, **k)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    load_model(env["mirage"])
    load_for_training(str(env["mirage"]))
    assert seen and not any(seen), seen


def test_export_holds_safetensors_only(env, tmp_path, capsys):
    rc, _, _ = run_cli(["export", "--model", env["mirage"], "--out", tmp_path / "x"], capsys)
    assert rc == 0
    names = sorted(p.name for p in (tmp_path / "x").iterdir())
    assert "model.safetensors" in names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))], names


def test_hub_token_never_printed(env, tmp_path):
    """A hub name that cannot be reached (offline) with HF_TOKEN set: one line, exit 2, no token anywhere."""
    out = tmp_path / "e"
    cmd = [
        sys.executable,
        "-m",
        "mirage_trl",
        "eval",
        "--model",
        "someorg/not-here",
        "--benchmark",
        "vsp_planning",
        "--data",
        str(env["data"]),
        "--out",
        str(out),
        "--no-progress",
    ]
    p = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=180,
        env=dict(
            os.environ,
            PYTHONPATH=str(REPO),
            HF_TOKEN=SECRET,
            HUGGING_FACE_HUB_TOKEN=SECRET,
            HF_HUB_OFFLINE="1",
        ),
    )
    errors = [line for line in p.stderr.splitlines() if line.startswith("mirage-trl eval: error:")]
    assert p.returncode == 2 and "Traceback" not in p.stderr and len(errors) == 1, p.stderr
    assert "someorg/not-here" in errors[0]
    assert SECRET not in p.stderr and SECRET not in p.stdout
    assert not out.exists()
