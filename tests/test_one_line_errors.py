"""The classes of input that used to end in a stack trace, each through the real command (in-process `main`, or
a subprocess where the process itself matters): one line naming the file, key, flag or folder, exit 2, found
before anything heavy, and nothing of the user's changed (docs/reliability.md, "One line for every command")."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, assert_cli_error, run_cli

# ------------------------------------------------------------------------------ model files


def _corrupt(path: Path, kind: str) -> None:
    data = path.read_bytes()
    path.write_bytes(
        {
            "truncated": data[: len(data) // 2],
            "garbage": os.urandom(4096),
            "empty": b"",
            "huge_header": (2**60).to_bytes(8, "little") + b"{}",
        }[kind]
    )


@pytest.fixture(scope="module")
def adapter_pair(env, tmp_path_factory):
    """A LoRA adapter over a Mirage base, both on disk."""
    from peft import LoraConfig, get_peft_model

    from mirage_trl.models.prepare import add_latent_tokens
    from mirage_trl.models.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("adapter_pair")
    model, processor = build_tiny_model(seed=0)
    add_latent_tokens(processor, model, latent_size=2)
    model.save_pretrained(root / "base")
    processor.save_pretrained(root / "base")
    peft = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    peft.peft_config["default"].base_model_name_or_path = str(root / "base")
    peft.save_pretrained(root / "adapter")
    processor.save_pretrained(root / "adapter")
    return root


def _command(name, model, env, tmp):
    return {
        "eval": [
            "eval",
            "--model",
            model,
            "--benchmark",
            "vsp_planning",
            "--data",
            env["data"],
            "--out",
            tmp / "o",
        ],
        "export": ["export", "--model", model, "--out", tmp / "o"],
        "analyze-latents": ["analyze-latents", "--model", model, "--data", env["data"], "--out", tmp / "o"],
    }[name]


@pytest.mark.parametrize("command", ["eval", "export", "analyze-latents"])
@pytest.mark.parametrize("where", ["model", "adapter", "adapter's base"])
@pytest.mark.parametrize("kind", ["truncated", "garbage", "empty", "huge_header"])
def test_corrupt_weights_are_one_line_in_every_command(
    env, adapter_pair, tmp_path, capsys, command, where, kind
):
    if where == "model":
        model = tmp_path / "model"
        shutil.copytree(env["mirage"], model)
        bad = model / "model.safetensors"
    else:
        shutil.copytree(adapter_pair, tmp_path / "pair")
        model = tmp_path / "pair" / "adapter"
        config = json.loads((model / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = str(tmp_path / "pair" / "base")
        (model / "adapter_config.json").write_text(json.dumps(config))
        bad = (
            model / "adapter_model.safetensors"
            if where == "adapter"
            else tmp_path / "pair" / "base" / "model.safetensors"
        )
    _corrupt(bad, kind)
    rc, _, err = run_cli(_command(command, model, env, tmp_path), capsys)
    assert_cli_error(rc, err, command, rf"{bad}: not a readable safetensors file, corrupt or truncated")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command", ["eval", "export", "analyze-latents"])
@pytest.mark.parametrize("model_type", ["paligemma", None])
def test_an_unsupported_or_missing_model_type_is_one_line(env, tmp_path, capsys, command, model_type):
    model = tmp_path / "model"
    shutil.copytree(env["mirage"], model)
    config = json.loads((model / "config.json").read_text())
    config.pop("model_type")
    if model_type:
        config["model_type"] = model_type
    (model / "config.json").write_text(json.dumps(config))
    rc, _, err = run_cli(_command(command, model, env, tmp_path), capsys)
    assert_cli_error(rc, err, command, rf"config\.json: model type {model_type!r} is not a supported vision-language model; supported: qwen2_5_vl")  # fmt: skip


# ------------------------------------------------------------------------------ experiment
@pytest.mark.parametrize(
    "yaml_text, pattern",
    [
        (
            "train:\n  learning_rate: fast\n",
            r"x\.yaml: train\.learning_rate: expected float, got str 'fast'$",
        ),
        ("train:\n  learning_rate: -0.1\n", r"x\.yaml: train\.learning_rate -0\.1: must be a number > 0$"),
        ("data:\n  tile_px: -3\n", r"x\.yaml: data\.tile_px -3: must be an integer >= 1$"),
        (
            "data:\n  levels: [3, '4']\n",
            r"x\.yaml: data\.levels: expected a list of int, got list \[3, '4'\]$",
        ),
        ("model:\n  hidden_size: true\n", r"x\.yaml: model\.hidden_size: expected int, got bool True$"),
        ("seeds: [0, 1.5]\n", r"x\.yaml: seeds: expected a list of int, got list \[0, 1\.5\]$"),
        ("name: 3\n", r"x\.yaml: name: expected str, got int 3$"),
        (
            "data:\n  grounding_max_hole_frac: 1.5\n",
            r"x\.yaml: data\.grounding_max_hole_frac 1\.5: must be in \[0, 1\)$",
        ),
    ],
)
def test_experiment_yaml_values_are_checked_before_any_data(tmp_path, capsys, yaml_text, pattern):
    (tmp_path / "x.yaml").write_text(yaml_text)
    rc, _, err = run_cli(["experiment", "--config", tmp_path / "x.yaml", "--out", tmp_path / "o"], capsys)
    assert_cli_error(rc, err, "experiment", pattern)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "content, pattern",
    [
        (None, r"--report-only: \S+results\.json does not exist$"),
        ("[1, 2]", r"results\.json: expected a JSON object$"),
        (
            '{"model": "m", "modes": {}}',
            r"is not the results of `mirage-trl experiment` \(no 'config' section\)$",
        ),
        (
            '{"config": {}, "data": {}, "runs": [{"arm": 3}]}',
            r"is not the results of `mirage-trl experiment` \(",
        ),
    ],
)
def test_report_only_on_what_is_not_an_experiments_results(tmp_path, capsys, content, pattern):
    if content is not None:
        (tmp_path / "results.json").write_text(content)
    before = sorted(p.name for p in tmp_path.iterdir())
    rc, _, err = run_cli(["experiment", "--out", tmp_path, "--report-only"], capsys)
    assert_cli_error(rc, err, "experiment", pattern)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


# ------------------------------------------------------------------------------ plot, card: where they write
@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    history = [{"step": s, "loss": 1.0 / s, "learning_rate": 1e-3} for s in (1, 2, 3)]
    (run / "trainer_state.json").write_text(json.dumps({"log_history": history, "global_step": 3}))
    return run


def test_plot_out_is_checked_before_drawing(run_dir, tmp_path, capsys):
    rc, _, err = run_cli(["plot", run_dir, "--out", tmp_path], capsys)
    assert_cli_error(rc, err, "plot", rf"--out: {tmp_path} is a folder, expected a file name$")
    (tmp_path / "blocker").write_text("keep")
    rc, _, err = run_cli(["plot", run_dir, "--out", tmp_path / "blocker" / "c.png"], capsys)
    assert_cli_error(
        rc,
        err,
        "plot",
        r"--out: \S+blocker lies under \S+blocker, which is a file$|--out: \S+blocker is a file",
    )
    rc, _, err = run_cli(["plot", run_dir, "--out", run_dir / "trainer_state.json"], capsys)
    assert_cli_error(
        rc, err, "plot", r"--out: \S+trainer_state\.json is the run's trainer_state\.json; write elsewhere$"
    )
    assert json.loads((run_dir / "trainer_state.json").read_text())["global_step"] == 3


def _read_only(monkeypatch, folder: Path):
    """A folder the process may not write (tests run as root, where chmod does not stop a write): creating a
    file there fails as the file system would fail it."""
    import tempfile

    real = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and Path(dir).resolve() == folder.resolve():
            raise PermissionError(13, "Permission denied", str(Path(dir) / ".x.tmp"))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


def test_plot_and_card_in_a_read_only_folder_are_one_line(run_dir, tmp_path, capsys, monkeypatch):
    _read_only(monkeypatch, run_dir)
    rc, _, err = run_cli(["plot", run_dir], capsys)
    assert_cli_error(rc, err, "plot", rf"cannot write in {run_dir} \(Permission denied\)$")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "README.md").write_text("the old card")
    results = {
        "model": str(model),
        "modes": {"model": {"groups": {"all": {"accuracy": 0.5, "invalid_rate": 0.0}}}},
    }
    (tmp_path / "r.json").write_text(json.dumps(results))
    _read_only(monkeypatch, model)
    rc, _, err = run_cli(["card", model, "--eval-json", tmp_path / "r.json"], capsys)
    assert_cli_error(rc, err, "card", rf"cannot write in {model} \(Permission denied\)$")
    assert (model / "README.md").read_text() == "the old card"


# ------------------------------------------------------------------------------ launching, the Hub
@pytest.mark.parametrize("content", ["foo: 1\nbar: [2]\n", "just text\n", '{"a": 1}'])
def test_accelerate_config_that_is_not_one_is_one_line(tmp_path, capsys, content):
    path = tmp_path / "acc.yaml"
    path.write_text(content)
    rc, _, err = run_cli(["train", "stage1", "--benchmark", "vsp", "--accelerate_config", path], capsys)
    assert_cli_error(rc, err, "train", rf"--accelerate_config {path}: not an accelerate config \(.+\); make one with `accelerate config --config_file FILE`, or name a shipped one \(ddp, zero2, zero3, zero3_offload\)$")  # fmt: skip


def test_push_to_hub_with_the_hub_offline_is_one_line_before_loading(env, tmp_path, monkeypatch):
    from helpers import _recipe_args, _recipe_argv, recipe_main

    from mirage_trl.errors import MirageError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = _recipe_argv(
        env, env["data"], tmp_path / "out", "--push_to_hub", "true", "--hub_model_id", "me/run"
    )
    with pytest.raises(
        MirageError, match=r"^--push_to_hub: the Hub is offline here \(HF_HUB_OFFLINE is set\)"
    ):
        recipe_main("stage1_vsp")(*_recipe_args(argv))
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ a full disk
def _limited(limit: int):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # writes past it fail: EFBIG


def _run_limited(argv, limit):
    return subprocess.run(
        [sys.executable, *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=_limited(limit),
        # no bytecode written under the limit: a cut .pyc would break the next import
        env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1"),
    )


def test_a_full_disk_is_one_line_for_eval_and_training(env, tmp_path):
    """The file system refuses a write (here a file-size limit, as a full disk refuses it): eval keeps its decoded
    rows and says where in one line; a training names its output folder; no stack trace, exit 2."""
    out = tmp_path / "eval"
    p = _run_limited(
        ["-m", "mirage_trl", "eval", "--model", env["mirage"], "--benchmark", "vsp_planning", "--data", env["data"],
         "--max-new-tokens", "3", "--greedy", "--no-progress", "--batch-size", "2", "--out", out],
        4096,
    )  # fmt: skip
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert last.startswith("mirage-trl eval: error: cannot write ") and "(File too large)" in last, last
    assert last.endswith(f"the 4 rows decoded so far are kept in {out}.partial.jsonl"), last
    assert not out.exists()
    p = _run_limited(
        [REPO / "recipes" / "stage1_vsp.py", "--config", REPO / "recipes" / "tiny" / "stage1" / "config_vsp_smoke.yaml",
         "--model_name_or_path", env["mirage"], "--dataset_name", env["data"], "--output_dir", tmp_path / "run",
         "--max_steps", "1", "--report_to", "none", "--latent_size", "2"],
        100_000,
    )  # fmt: skip
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert last == f"stage1_vsp.py: error: cannot write {tmp_path / 'run'} (File too large)", last


def test_what_the_file_system_refuses_is_named_as_it_happened():
    """A permission error may be a read: it is not called a failed write; a temporary file is named by its folder."""
    from mirage_trl.errors import storage_error

    assert (
        str(storage_error(PermissionError(13, "Permission denied", "/d/rows.jsonl")))
        == "/d/rows.jsonl: Permission denied"
    )
    assert (
        str(storage_error(PermissionError(13, "Permission denied", "/d/.card.md.x1.tmp")))
        == "cannot write in /d (Permission denied)"
    )
    assert (
        str(storage_error(OSError(28, "No space left on device", "/d/r.json")))
        == "cannot write /d/r.json (No space left on device)"
    )
    assert (
        storage_error(FileNotFoundError(2, "No such file", "/d")) is None
    )  # not the disk's doing: a real error
    err = RuntimeError(
        "Error while serializing: I/O error: No space left on device (os error 28)"
    )  # safetensors
    assert str(storage_error(err)) == "cannot write: No space left on device"
