"""`mirage-trl --version` and `mirage-trl env` (through the installed command, as users run them)."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version

import mirage_trl


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "mirage_trl", *args], capture_output=True, text=True, timeout=120
    )


def test_version_flag():
    proc = _cli("--version")
    assert proc.returncode == 0
    assert (
        proc.stdout.strip() == f"mirage-trl {mirage_trl.__version__}" == f"mirage-trl {version('mirage-trl')}"
    )


def test_env_lists_installed_versions():
    proc = _cli("env")
    assert proc.returncode == 0, proc.stderr
    lines = dict(
        line[2:].split(": ", 1) for line in proc.stdout.splitlines() if line.startswith("- ") and ": " in line
    )
    for name in ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "huggingface_hub"):
        assert lines[f"{name} version"] == version(name)
    assert lines["mirage-trl version"] == mirage_trl.__version__
    assert lines["Python version"] == ".".join(map(str, sys.version_info[:3]))
    assert lines["Accelerator"]  # a device name or "none (CPU)"
