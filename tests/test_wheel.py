"""The wheel alone is enough: built from the sources, installed into a fresh virtual environment outside the
repository, it trains a tiny stage 1 with `mirage-trl train` on a shipped YAML and evaluates it.

The fresh environment borrows the test environment's dependencies (torch, transformers, ...) through a
`.pth` line, since nothing can be downloaded here; mirage-trl itself comes only from the wheel, which the
test checks (the repository is neither the working folder nor on the path)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest
from helpers import REPO

# what the wheel is built from (what a source distribution holds)
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "mirage_trl", "recipes", "zero_configs", "bench/configs")


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    for name in SOURCES:
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        copy(REPO / name, src / name)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            root / "dist",
            src,
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = (root / "dist").glob("mirage_trl-*.whl")
    env_dir = root / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # the dependencies, not mirage-trl: a plain path line runs none of that folder's .pth files (the editable
    # install's finder among them)
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    environ = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    environ["PATH"] = f"{env_dir / 'bin'}{os.pathsep}{environ['PATH']}"
    subprocess.run(
        [python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel],
        check=True,
        capture_output=True,
        env=environ,
    )
    work = root / "work"
    work.mkdir()
    return dict(wheel=wheel, bin=env_dir / "bin", python=python, env=environ, work=work)


def _run(wheel_env, *argv, check=True):
    result = subprocess.run(
        [str(a) for a in argv], cwd=wheel_env["work"], env=wheel_env["env"], capture_output=True, text=True
    )
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_the_wheel_carries_recipes_yamls_and_configs(wheel_env):
    import zipfile

    names = set(zipfile.ZipFile(wheel_env["wheel"]).namelist())
    for name in (
        "mirage_trl/recipes/stage1_vsp.py",
        "mirage_trl/recipes/mirage_sft.py",
        "mirage_trl/recipes/Qwen2.5-VL-7B-Instruct/stage2/config_vsp_lora.yaml",
        "mirage_trl/recipes/tiny/stage1/config_vsp_smoke.yaml",
        "mirage_trl/zero_configs/zero2.yaml",
        "mirage_trl/model_configs/qwen2_5_vl_7b_instruct.json",
        "mirage_trl/experiments/vsp_planning.yaml",
    ):
        assert name in names, name
    assert any(n.endswith("dist-info/licenses/LICENSE") for n in names)
    # every YAML and recipe of the repository is in it
    shipped = {n for n in names if n.startswith("mirage_trl/recipes/")}
    expected = {
        f"mirage_trl/recipes/{p.relative_to(REPO / 'recipes')}" for p in (REPO / "recipes").rglob("*.y*ml")
    }
    assert expected and expected <= shipped


def test_a_wheel_only_install_trains_and_evaluates(wheel_env):
    where = _run(wheel_env, wheel_env["python"], "-c", "import mirage_trl; print(mirage_trl.__file__)").stdout
    assert where.strip().startswith(str(wheel_env["bin"].parent)), where
    cli = wheel_env["bin"] / "mirage-trl"
    _run(wheel_env, cli, "tiny-model", "--out", "tiny")
    _run(wheel_env, cli, "data", "vsp", "--task", "planning", "--split", "train", "--style", "cot", "--levels", "3",
         "--num-samples", "4", "--out", "data")  # fmt: skip
    train = _run(
        wheel_env, cli, "train", "stage1", "--benchmark", "vsp", "--cpu", "--config", "smoke",
        "--model_name_or_path", "tiny", "--dataset_name", "data/planning_train_cot.jsonl",
        "--output_dir", "stage1", "--max_steps", "1", "--per_device_train_batch_size", "2",
    )  # fmt: skip
    out = wheel_env["work"] / "stage1"
    assert json.loads((out / "mirage_config.json").read_text())["stages"] == [1], train.stderr[-2000:]
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 1
    _run(wheel_env, cli, "eval", "--model", "stage1", "--benchmark", "vsp_planning", "--data",
         "data/planning_train_cot.jsonl", "--greedy", "--num-samples", "2", "--max-new-tokens", "4",
         "--no-progress", "--out", "eval")  # fmt: skip
    results = json.loads((wheel_env["work"] / "eval" / "results.json").read_text())
    assert results["modes"]["model"]["groups"]["all"]["n"] == 2
    # a shipped name that does not exist is one line naming what is shipped
    bad = _run(wheel_env, cli, "train", "stage1", "--benchmark", "vsp", "--config", "huge", check=False)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1] == (
        "mirage-trl train: error: --config huge: no such file or shipped YAML (shipped: "
        "InternVL3-8B-hf/stage1/config_vsp_lora, "
        "Qwen2.5-VL-7B-Instruct/stage1/config_vsp_full, Qwen2.5-VL-7B-Instruct/stage1/config_vsp_lora, "
        "Qwen3.5-9B/stage1/config_vsp_lora, SmolVLM2-2.2B-Instruct/stage1/config_vsp_lora, "
        "gemma-3-4b-it/stage1/config_vsp_lora, llava-onevision-qwen2-7b-ov-hf/stage1/config_vsp_lora, "
        "tiny/stage1/config_vsp_demo, tiny/stage1/config_vsp_smoke)"
    )
