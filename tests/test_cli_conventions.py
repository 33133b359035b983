"""CLI conventions: `--version`, `mirage-trl env`, every option documented with its default, one sampling
default for eval and analyze-latents (the first two through the command, as users run them)."""

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


def _options(parser, prefix=()):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _options(sub, (*prefix, name))
        elif action.option_strings and action.dest not in ("help", "version"):
            yield " ".join(prefix), action


def test_every_option_has_help_and_shows_its_default():
    from mirage_trl.cli import build_parser

    options = list(_options(build_parser()))
    assert len(options) > 80  # every subcommand was walked
    missing = [f"{cmd} {a.option_strings[0]}" for cmd, a in options if not (a.help or "").strip()]
    assert missing == []
    proc = _cli("eval", "--help")
    assert proc.returncode == 0 and "(default: 0.7)" in proc.stdout and "(default: 42)" in proc.stdout


def test_eval_and_analyze_latents_share_the_sampling_defaults():
    from mirage_trl.cli import build_parser

    by_command = {}
    for cmd, a in _options(build_parser()):
        by_command.setdefault(cmd, {})[a.dest] = a.default
    for key in ("temperature", "top_p", "seed", "greedy"):
        assert by_command["eval"][key] == by_command["analyze-latents"][key], key
    assert by_command["eval"]["greedy"] is False  # both sample unless --greedy


def test_dashed_and_underscore_flags_are_one_option():
    from mirage_trl.cli import build_parser

    parser = build_parser()
    common = ["eval", "--model", "m", "--benchmark", "vsp_planning", "--data", "d.jsonl", "--out", "o"]
    dashed = parser.parse_args([*common, "--max-new-tokens", "7", "--batch-size", "3"])
    underscored = parser.parse_args([*common, "--max_new_tokens", "7", "--batch_size", "3"])
    assert (
        (dashed.max_new_tokens, dashed.batch_size)
        == (underscored.max_new_tokens, underscored.batch_size)
        == (7, 3)
    )
    data = parser.parse_args(
        ["data", "vsp", "--task", "grounding", "--num_samples", "4", "--out", "x", "--tile_px", "28"]
    )
    assert (data.num_samples, data.tile_px) == (4, 28)


def test_train_names_the_text_baseline_text_sft_and_still_takes_sft(capsys):
    """`mirage-trl train text_sft` runs the text-only baseline's recipe; the older `sft` is the same, with a note."""
    import argparse

    from mirage_trl.cli.train import _recipe

    new = _recipe(argparse.Namespace(recipe="text_sft", benchmark="vsp_reasoning"))
    assert (new[0].name, new[1:]) == (
        "text_sft_vsp.py",
        ("text_sft", "vsp", ["--benchmark", "vsp_reasoning"]),
    )
    assert capsys.readouterr().err == ""
    old = _recipe(argparse.Namespace(recipe="sft", benchmark="vsp_reasoning"))
    assert old == new
    assert "`mirage-trl train sft` is now `mirage-trl train text_sft`" in capsys.readouterr().err
