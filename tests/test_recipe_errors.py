"""Every recipe error path is one line and exit 2, found before the model loads, through `python recipes/stage1_vsp.py` subprocesses, and once through `mirage-trl train` over
`accelerate launch`, where that line is the last one on screen."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "stage1_vsp.py"
TINY_YAML = REPO / "recipes" / "tiny" / "stage1" / "config_vsp_smoke.yaml"


@pytest.fixture(scope="module")
def env(tiny_run_inputs):
    return tiny_run_inputs  # (model folder, data JSONL)


def _yaml(tmp, text):
    path = tmp / "x.yaml"
    path.write_text(text)
    return ["--config", path]


def _model(tmp, env, edit):
    folder = tmp / "model"
    shutil.copytree(env[0], folder)
    edit(folder)
    return ["--model_name_or_path", folder]


def _config_edit(**kw):
    def edit(folder):
        config = json.loads((folder / "config.json").read_text())
        config.update(kw)
        (folder / "config.json").write_text(json.dumps(config))

    return edit


def _truncate(folder):
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _adapter(base):
    def make(tmp, env):
        folder = tmp / "adapter"
        folder.mkdir()
        (folder / "adapter_config.json").write_text(
            json.dumps({"base_model_name_or_path": base, "peft_type": "LORA"})
        )
        (folder / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
        return ["--model_name_or_path", folder]

    return make


def _file(tmp):
    path = tmp / "blocker"
    path.write_text("keep")
    return path


CASES = {
    "yaml_empty": (lambda t, e: _yaml(t, ""), r"x\.yaml: the file is empty"),
    "yaml_list": (lambda t, e: _yaml(t, "- a\n- b\n"), r"x\.yaml: expected a mapping .*got a list"),
    "yaml_scalar": (lambda t, e: _yaml(t, "42\n"), r"x\.yaml: expected a mapping .*got a int"),
    "yaml_syntax": (lambda t, e: _yaml(t, "max_steps: [1, 2\n"), r"x\.yaml:\d+: YAML syntax error"),
    "yaml_unknown_key": (lambda t, e: _yaml(t, "lerning_rate: 0.1\n"), r"x\.yaml: unknown key 'lerning_rate'"),
    "yaml_wrong_type": (lambda t, e: _yaml(t, "max_steps: [1]\n"), r"x\.yaml:max_steps: expected int, got list"),
    "missing_config": (lambda t, e: ["--config", t / "nowhere.yaml"], r"--config \S+nowhere\.yaml: no such file"),
    "flag_wrong_type": (lambda t, e: ["--max_steps", "many"], r"argument --max_steps(/--max-steps)?: invalid int value: 'many'"),
    "flag_unknown": (lambda t, e: ["--lerning_rate", "1"], r"lerning_rate"),
    "batch_size_zero": (lambda t, e: ["--per_device_train_batch_size", "0"], r"--per_device_train_batch_size 0: must be"),
    "nan_learning_rate": (lambda t, e: ["--learning_rate", "nan"], r"--learning_rate nan: must be a finite number > 0"),
    "output_is_file": (lambda t, e: ["--output_dir", _file(t)], r"--output_dir: \S+blocker is a file"),
    "output_under_file": (lambda t, e: ["--output_dir", _file(t) / "o"], r"--output_dir: \S+ lies under \S+blocker, which is a file"),
    "output_name_too_long": (lambda t, e: ["--output_dir", t / ("n" * 300)], r"--output_dir: the name n+\.\.\. is longer"),
    "resume_missing": (lambda t, e: ["--resume_from_checkpoint", t / "ckpt"], r"--resume_from_checkpoint \S+ckpt: no such checkpoint folder"),
    "resume_is_file": (lambda t, e: ["--resume_from_checkpoint", _file(t)], r"--resume_from_checkpoint \S+blocker: is a file"),
    "resume_not_checkpoint": (lambda t, e: (t / "c").mkdir() or ["--resume_from_checkpoint", t / "c"], r"--resume_from_checkpoint \S+: not a complete checkpoint"),
    "model_without_config": (lambda t, e: (t / "m").mkdir() or ["--model_name_or_path", t / "m"], r"--model_name_or_path \S+: no config\.json"),
    "text_only_model": (lambda t, e: _model(t, e, _config_edit(model_type="qwen2")), r"config\.json: model type 'qwen2' is not a supported vision-language model; supported: qwen2_5_vl, qwen2_vl"),
    "truncated_safetensors": (lambda t, e: _model(t, e, _truncate), r"model\.safetensors: not a readable safetensors file, corrupt or truncated"),
    "adapter_base_missing": (_adapter("/nowhere/base-model"), r"adapter_config\.json: base model /nowhere/base-model: no such model folder"),
    "corrupt_adapter": (lambda t, e: _adapter(str(e[0]))(t, e), r"adapter_model\.safetensors: not a readable safetensors file, corrupt or truncated"),
    "report_to_missing": (lambda t, e: ["--report_to", "wandb"], r"--report_to wandb: the wandb package is not installed \(pip install 'mirage-trl\[wandb\]', or --report_to none\)"),
    "mirage_settings_wrong_type": (lambda t, e: _model(t, e, _config_edit(mirage={"latent_size": "four"})), r"config\.json:mirage: latent_size must be an integer >= 1, got 'four'"),
    "liger": (lambda t, e: ["--use_liger_kernel", "true"], r"--use_liger_kernel: not supported by the Mirage trainers: Liger patches the model's forward"),
    "torch_compile": (lambda t, e: ["--torch_compile", "true"], r"--torch_compile: not supported by the Mirage trainers: the latent rounds change shape"),
    "packing": (lambda t, e: ["--packing", "true"], r"--packing: not supported by the Mirage trainers: latent slots and rounds are laid out per row"),
    "padding_free": (lambda t, e: ["--padding_free", "true"], r"--padding_free: not supported by the Mirage trainers"),
    "max_round_tokens_zero": (lambda t, e: ["--max_round_tokens", "0"], r"--max_round_tokens 0: must be an integer from 1 to"),
    "logits_chunk_negative": (lambda t, e: ["--logits_chunk_size", "-1"], r"--logits_chunk_size -1: must be an integer from 0 to"),
}  # fmt: skip


def _base_argv(env, tmp):
    model, data = env
    return [
        "--config", TINY_YAML, "--model_name_or_path", model, "--dataset_name", data,
        "--output_dir", tmp / "out", "--max_steps", "1",
    ]  # fmt: skip


def _merge(base, extra):
    """Later flags win, as on a command line; a case's own --config replaces the tiny YAML."""
    out = list(base)
    if "--config" in extra:
        i = out.index("--config")
        del out[i : i + 2]
    return out + extra


def _check_one_line(rc, stderr, pattern, tmp_path):
    errors = [line for line in stderr.splitlines() if line.startswith("stage1_vsp.py: error:")]
    assert rc == 2 and "Traceback" not in stderr and len(errors) == 1, stderr[-2000:]
    assert re.search(pattern, errors[0]), errors[0]
    assert stderr.strip().splitlines()[-1] == errors[0]
    assert "Loading weights" not in stderr  # found before the model loads
    assert not (tmp_path / "out").exists()


# What a user sees is what `python recipes/stage1_vsp.py` prints: these cases run as that subprocess (one of
# each kind: YAML, flag, model files, backend); every case also runs the same script in this process
# (`runpy`, `__main__`, the same argv), which costs no interpreter start and import per case.
SUBPROCESS_CASES = ("yaml_syntax", "flag_wrong_type", "truncated_safetensors", "report_to_missing")


@pytest.mark.parametrize("case", SUBPROCESS_CASES)
def test_recipe_error_is_one_line_before_the_model_loads(env, tmp_path, case):
    make, pattern = CASES[case]
    argv = _merge(_base_argv(env, tmp_path), make(tmp_path, env))
    p = subprocess.run(
        [sys.executable, str(RECIPE), *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=180,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    _check_one_line(p.returncode, p.stderr, pattern, tmp_path)


@pytest.mark.parametrize("case", list(CASES))
def test_recipe_error_in_process_is_one_line_before_the_model_loads(env, tmp_path, case, capsys, monkeypatch):
    import runpy

    make, pattern = CASES[case]
    argv = _merge(_base_argv(env, tmp_path), make(tmp_path, env))
    monkeypatch.setattr(sys, "argv", [str(RECIPE), *map(str, argv)])
    monkeypatch.syspath_prepend(str(RECIPE.parent))  # as `python recipes/x.py` puts the script's folder first
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(RECIPE), run_name="__main__")
    _check_one_line(exit_info.value.code, capsys.readouterr().err, pattern, tmp_path)


def test_lora_under_zero3_is_refused_before_the_model_loads(env, tmp_path, capsys, monkeypatch):
    """`accelerate launch --config_file zero_configs/zero3.yaml` with a LoRA recipe: PEFT's trainable token rows
    cannot run on a partitioned embedding, so one line says so and names the config that works."""
    import runpy

    monkeypatch.setenv(
        "ACCELERATE_DEEPSPEED_ZERO_STAGE", "3"
    )  # what accelerate launch sets from a ZeRO-3 config
    argv = _merge(_base_argv(env, tmp_path), ["--use_peft", "true"])
    monkeypatch.setattr(sys, "argv", [str(RECIPE), *map(str, argv)])
    monkeypatch.syspath_prepend(str(RECIPE.parent))
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(RECIPE), run_name="__main__")
    pattern = r"LoRA under DeepSpeed ZeRO-3 is not supported: PEFT's trainable token rows .* zero_configs/zero2\.yaml"
    _check_one_line(exit_info.value.code, capsys.readouterr().err, pattern, tmp_path)


def _mirage_trl_train(argv):
    """`mirage-trl train recipes/stage1_vsp.py --cpu ...` (accelerate launch underneath), as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "mirage_trl", "train", str(RECIPE), "--cpu", *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )


def test_accelerate_launch_through_mirage_trl_train_ends_with_the_message(env, tmp_path):
    p = _mirage_trl_train(_base_argv(env, tmp_path) + ["--learning_rate", "inf"])
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert last == "mirage-trl train: error: --learning_rate inf: must be a finite number > 0", last
    assert not (tmp_path / "out").exists()


def test_shipped_7b_yamls_report_to_is_checked_before_loading(monkeypatch):
    import importlib.util

    import yaml

    from mirage_trl.errors import MirageError
    from mirage_trl.preflight import check_report_to

    backends = {yaml.safe_load(p.read_text())["report_to"] for p in (REPO / "recipes").glob("*/*/*.yaml")} - {
        "none"
    }
    assert backends == {"tensorboard"}
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if "tensorboard" in name.lower() else real(name, *a),
    )
    with pytest.raises(MirageError) as e:
        check_report_to(["tensorboard"])
    assert str(e.value) == (
        "--report_to tensorboard: the tensorboard package is not installed "
        "(pip install 'mirage-trl[tensorboard]', or --report_to none)"
    )
    check_report_to(["none"])  # nothing to check
    check_report_to("all")


def test_an_error_after_the_progress_bar_started_is_the_last_line(env, tmp_path):
    """A broken helper image is found in the first batch, after the Trainer's progress bar has started: the
    recipe ends the bar before printing, and `mirage-trl train` still ends with the message itself."""
    from helpers import broken_image

    model, data = env
    objs = [json.loads(line) for line in Path(data).read_text().splitlines()]
    for o in objs:
        o["image_input"] = str((Path(data).parent / o["image_input"]).resolve())
        o["image_output"] = str((Path(data).parent / o["image_output"]).resolve())
    objs[0]["image_output"] = broken_image(tmp_path / "img", "truncated")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(o) + "\n" for o in objs))
    argv = [
        "--config", TINY_YAML, "--model_name_or_path", model, "--dataset_name", bad,
        "--output_dir", tmp_path / "out", "--max_steps", "1", "--disable_tqdm", "false",
    ]  # fmt: skip
    p = _mirage_trl_train(argv)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert "0/1 [" in p.stderr  # the bar had started
    worker = [line for line in p.stderr.splitlines() if "stage1_vsp.py: error: " in line]
    assert len(worker) == 1 and worker[0].startswith("stage1_vsp.py: error: "), worker  # on a line of its own
    last = p.stderr.strip().splitlines()[-1]
    assert re.fullmatch(
        r"mirage-trl train: error: \S+bad\.jsonl:1:helper_images: broken or truncated image .+", last
    ), last
