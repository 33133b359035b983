"""Unknown names (benchmark, training setting, reward, latent ablation): one line naming the flag, before any work. (docs/reliability.md)."""

from __future__ import annotations

import pytest
from helpers import (
    _recipe_args,
    _recipe_argv,
    assert_cli_error,
    run_cli,
)

from mirage_trl.errors import MirageError


def test_unknown_benchmark(env, tmp_path, capsys):
    from mirage_trl.data.reference import load_reference_jsonl
    from mirage_trl.grading import grade

    valid = "vsp_planning, vsp_reasoning, vsp_grounding, jigsaw, sat, comt"
    with pytest.raises(MirageError, match=f"unknown benchmark 'maze'; valid: {valid}"):
        load_reference_jsonl(env["data"], benchmark="maze")
    with pytest.raises(MirageError, match="unknown benchmark 'maze'"):
        grade("maze", "\\boxed{A}", {"answer": "A"})
    rc, _, err = run_cli(["data", "check", "--data", env["data"], "--benchmark", "maze"], capsys)
    assert_cli_error(rc, err, "data", f"--benchmark: unknown benchmark 'maze'; valid: {valid}")
    rc, _, err = run_cli(
        [
            "eval",
            "--model",
            env["mirage"],
            "--benchmark",
            "maze",
            "--data",
            env["data"],
            "--out",
            tmp_path / "e",
        ],
        capsys,
    )
    assert_cli_error(rc, err, "eval", f"unknown benchmark 'maze'; valid: {valid}")
    from helpers import recipe_main

    args = _recipe_args(_recipe_argv(env, env["data"], tmp_path / "r", "--benchmark", "maze"))
    with pytest.raises(MirageError, match="unknown benchmark 'maze'"):
        recipe_main("stage1_vsp")(*args)
    assert not (tmp_path / "e").exists() and not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    ("flag", "value", "pattern"),
    [
        ("--latent_pooling", "mean", r"--latent_pooling 'mean': choose one of drop_remainder, even"),
        ("--latent_truncation", "cut", r"--latent_truncation 'cut': choose 'error' or 'drop'"),
        ("--stage2_method", "fast", r"--stage2_method 'fast': choose one of auto, rounds"),
        ("--latent_size", "0", r"--latent_size 0: must be an integer from 1 to 64"),
    ],
)
def test_unknown_training_setting_names_the_flag(env, tmp_path, flag, value, pattern):
    with pytest.raises(MirageError, match=pattern):
        _recipe_args(_recipe_argv(env, env["data"], tmp_path / "r", flag, value))
    assert not (tmp_path / "r").exists()


def test_unknown_reward_name(tmp_path):
    from trl import ModelConfig, TrlParser

    from mirage_trl.configs import MirageGRPOConfig, MirageScriptArguments
    from mirage_trl.rewards import get_reward_funcs

    parser = TrlParser((MirageScriptArguments, MirageGRPOConfig, ModelConfig))
    with pytest.raises(MirageError, match=r"unknown reward 'accurcy'; valid: accuracy"):
        parser.parse_args_and_config(
            args=[
                "--output_dir",
                str(tmp_path / "g"),
                "--use_cpu",
                "true",
                "--reward_names",
                "accurcy",
                "format",
            ]
        )
    with pytest.raises(MirageError, match="unknown reward 'x'"):
        get_reward_funcs(["x"])


def test_unknown_latent_ablation(env, tmp_path, capsys):
    from mirage_trl.generation import generate_with_latents

    rc, _, err = run_cli(
        [
            "eval",
            "--model",
            env["mirage"],
            "--benchmark",
            "vsp_planning",
            "--data",
            env["data"],
            "--latents",
            "model",
            "blur",
            "--out",
            tmp_path / "e",
        ],
        capsys,
    )
    assert_cli_error(
        rc, err, "eval", r"unknown latent mode 'blur'; valid modes: model, zero, noise, mean, shuffle, remove"
    )
    with pytest.raises(MirageError, match="unknown latent mode 'blur'"):
        generate_with_latents(None, env["processor"], {}, latent_mode="blur")
    assert not (tmp_path / "e").exists()
